//! tidepool's integration tests: one binary, one module per area.

mod backtest_determinism;
mod backtest_parquet;
mod checkpoint_cut;
mod common;
mod models;
mod movielens_oracle;
mod variants;
