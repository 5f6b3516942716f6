//! Facts about this machine read from `/proc` (Linux); `None` elsewhere.

/// The kB figure of the line starting with `key` in a `/proc` file such as `/proc/meminfo`.
pub fn proc_kib(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The CPU's bf16 arithmetic, as far as the OS lets programs use it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bf16Units {
    /// `vdpbf16ps`: bf16 pair dot products in AVX-512 registers.
    pub avx512_bf16: bool,
    /// AMX tiles with bf16 products (`tdpbf16ps`), enabled in XCR0 by the OS.
    pub amx_bf16: bool,
}

impl Bf16Units {
    /// One line for warnings and `env`.
    pub fn describe(&self) -> &'static str {
        match (self.amx_bf16, self.avx512_bf16) {
            (true, _) => "AMX-BF16 tiles",
            (false, true) => "AVX512-BF16 but no AMX tiles",
            (false, false) => "no bf16 arithmetic",
        }
    }
}

/// What [`Bf16Units`] this CPU offers (CPUID leaf 7 and XCR0 on x86-64; none elsewhere).
pub fn bf16_units() -> Bf16Units {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        let (leaf1, leaf7) = (__cpuid(1), __cpuid_count(7, 0));
        let osxsave = leaf1.ecx & (1 << 27) != 0;
        // XCR0 bits 17 and 18: the OS saves tile configuration and tile data.
        // SAFETY: XGETBV is available when the OS has set OSXSAVE.
        let tiles = osxsave && unsafe { xcr0() } & (0b11 << 17) == (0b11 << 17);
        Bf16Units {
            avx512_bf16: std::arch::is_x86_feature_detected!("avx512bf16"),
            amx_bf16: tiles && leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    Bf16Units::default()
}

/// Whether the CPU has AVX-512F (x86-64 only; `false` elsewhere).
pub fn avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}
