//! Several variants trained side by side over one pass of the history.

use tidepool_connector_generator::{GeneratorConfig, GeneratorSource};
use tidepool_operators::{ModelConfig, VariantConfig};

use crate::common::{assert_same_quality, config, run};
use std::sync::Arc;
use tidepool_operators::ModelKind;

fn source() -> Arc<GeneratorSource> {
    Arc::new(
        GeneratorSource::new(GeneratorConfig {
            events: 30_000,
            users: 400,
            items: 600,
            ..GeneratorConfig::default()
        })
        .unwrap(),
    )
}

#[test]
fn variants_share_one_pass_without_interfering() {
    let specs = [
        "uniform=uniform",
        "pop=pop:0.75",
        "decay=decay:5min",
        "dns=dns:16",
        "inbatch=inbatch:256",
        "mix=mix:1*pop:0.75+1*dns:8",
        "mostpop=,model=mostpop",
    ];
    let mut cfg = config(ModelKind::Bpr, 1);
    cfg.variants = specs
        .iter()
        .map(|s| VariantConfig::parse(s, &ModelConfig::default()).unwrap())
        .collect();
    let (together, _) = run(source(), &cfg);
    assert_eq!(together.variants.len(), specs.len());
    for v in &together.variants {
        assert_eq!(v.total.events, 30_000, "{}", v.name);
        assert_eq!(v.total.scored, 2_700, "{}", v.name);
        if v.name != "mostpop" {
            assert!(
                v.total.pairs > 100_000,
                "{} trained {} pairs",
                v.name,
                v.total.pairs
            );
        }
    }
    // A variant's result does not depend on which others ran beside it: each has its
    // own model, sampler and random stream.
    for (i, spec) in specs.iter().enumerate() {
        let mut alone = config(ModelKind::Bpr, 1);
        let mut v = VariantConfig::parse(spec, &ModelConfig::default()).unwrap();
        v.name = together.variants[i].name.clone();
        alone.variants = vec![v];
        // The random stream of a variant is keyed by its position: put it first in both.
        let mut reordered = cfg.clone();
        reordered.variants.swap(0, i);
        let (a, _) = run(source(), &alone);
        let (b, _) = run(source(), &reordered);
        assert_same_quality(&a.variants[0].total, &b.variants[0].total, spec);
    }
}

#[test]
fn popularity_samplers_work_on_two_workers() {
    let mut cfg = config(ModelKind::Bpr, 2);
    cfg.variants = ["pop=pop:0.75", "mix=mix:1*pop:1+1*uniform"]
        .iter()
        .map(|s| VariantConfig::parse(s, &ModelConfig::default()).unwrap())
        .collect();
    cfg.popularity_window_ms = 10 * 60_000;
    let (report, _) = run(source(), &cfg);
    for v in &report.variants {
        assert_eq!(v.total.events, 30_000);
        assert!(v.total.recall() > 0.0, "{} learned nothing", v.name);
    }
    assert!(
        report.tick_ms <= 10 * 60_000 / 16,
        "tick {} too coarse for the window",
        report.tick_ms
    );
}
