//! Reproducibility: one worker and a fixed seed give bit-identical results; the
//! protocol's outcome for `mostpop` does not depend on the number of workers.

use std::sync::Arc;

use tidepool_connector_generator::{GeneratorConfig, GeneratorSource};
use tidepool_operators::ModelKind;

use crate::common::{assert_same_quality, config, run};

fn source(events: u64) -> Arc<GeneratorSource> {
    Arc::new(
        GeneratorSource::new(GeneratorConfig {
            events,
            users: 500,
            items: 800,
            ..GeneratorConfig::default()
        })
        .unwrap(),
    )
}

#[test]
fn one_worker_and_a_seed_are_bit_identical() {
    let cfg = config(ModelKind::Bpr, 1);
    let (a, _) = run(source(30_000), &cfg);
    let (b, _) = run(source(30_000), &cfg);
    assert_eq!(a.variants, b.variants, "same seed, same metrics to the bit");
    assert!(a.variants[0].total.pairs > 0);
    let mut other = cfg.clone();
    other.seed += 1;
    let (c, _) = run(source(30_000), &other);
    assert_ne!(a.variants[0].total.loss_sum, c.variants[0].total.loss_sum);
}

#[test]
fn mostpop_is_the_same_on_one_two_and_three_workers() {
    let (one, _) = run(source(40_000), &config(ModelKind::Mostpop, 1));
    for workers in [2, 3] {
        let (many, _) = run(source(40_000), &config(ModelKind::Mostpop, workers));
        let what = format!("workers={workers}");
        assert_same_quality(&many.variants[0].total, &one.variants[0].total, &what);
        assert_eq!(
            many.variants[0].windows.len(),
            one.variants[0].windows.len()
        );
        for (m, o) in many.variants[0]
            .windows
            .iter()
            .zip(&one.variants[0].windows)
        {
            assert_eq!(m.start_ms, o.start_ms);
            assert_same_quality(&m.quality, &o.quality, &what);
        }
        assert_eq!(many.users, one.users);
    }
}

#[test]
fn bpr_learns_the_synthetic_stream_better_than_popularity() {
    let (pop, _) = run(source(60_000), &config(ModelKind::Mostpop, 1));
    let (bpr, _) = run(source(60_000), &config(ModelKind::Bpr, 2));
    let (p, b) = (
        pop.variants[0].total.recall(),
        bpr.variants[0].total.recall(),
    );
    assert!(b > 1.2 * p, "bpr recall {b} vs mostpop {p}");
}
