//! The vendored candle's copies and element-wise ops share their work out over the rayon pool
//! that calls them (`vendor/README.md`, change 5): on a pool's worker they give exactly what
//! they give off it, for the layouts a step makes — heads transposed to contiguous, a
//! concatenation along the last dimension, broadcast and plain binary ops, a unary op.

use candle_core::{Device, Tensor};

fn wave(shape: &[usize], seed: f32) -> Tensor {
    let len: usize = shape.iter().product();
    Tensor::from_vec(super::test_util::wave(len, seed), shape, &Device::Cpu).unwrap()
}

fn results() -> Vec<Vec<f32>> {
    let x = wave(&[2, 300, 9, 64], 0.0);
    let a = wave(&[600, 576], 1.0);
    let b = wave(&[600, 200], 2.0);
    let row = wave(&[1, 576], 3.0);
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    vec![
        flat(x.transpose(1, 2).unwrap().contiguous().unwrap()),
        flat(Tensor::cat(&[&a, &b], 1).unwrap()),
        flat(a.broadcast_add(&row).unwrap()),
        flat((&a * &a.exp().unwrap()).unwrap()),
        flat(a.t().unwrap().contiguous().unwrap()),
    ]
}

#[test]
fn work_shared_over_a_pool_gives_the_serial_results() {
    let serial = results();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let pooled = pool.install(results);
    for (i, (s, p)) in serial.iter().zip(&pooled).enumerate() {
        assert_eq!(s.len(), p.len());
        assert!(s == p, "result {i} differs on the pool");
    }
    // The transposed copy is a real transpose (not, say, the input again).
    assert_ne!(serial[0], super::test_util::wave(2 * 300 * 9 * 64, 0.0));
}
