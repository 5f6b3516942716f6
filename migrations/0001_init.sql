-- The run registry. Times are unix seconds (REAL).
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('train', 'predict', 'export')),
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'aborted', 'interrupted')),
    config TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    model TEXT NOT NULL,
    dataset TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    exit_code INTEGER,
    error TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    final_loss REAL,
    result TEXT NOT NULL DEFAULT '{}',
    log_path TEXT NOT NULL DEFAULT ''
);
CREATE INDEX runs_status ON runs (status);

-- One row per (run, step): train and eval values of a step are merged.
CREATE TABLE metrics (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    loss REAL,
    eval_loss REAL,
    lr REAL,
    epoch REAL,
    grad_norm REAL,
    tokens_per_sec REAL,
    elapsed_s REAL,
    eta_s REAL,
    total INTEGER,
    extra TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, step)
);

-- Everything a run's WebSocket sends, so late subscribers replay it without gaps.
CREATE TABLE events (
    run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE arg_sets (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    updated_at REAL NOT NULL
);

CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
