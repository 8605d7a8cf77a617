//! Micro-benchmarks of the replay's stages, on realistic records from the seed generator (all three
//! schema versions): envelope decoding, the upcaster chain, projecting, and folding row changes.
//!
//! `cargo bench --bench pipeline`. The end-to-end figure comes from `reproject bench`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use reproject::domain::shop::generator::{History, HistoryConfig};
use reproject::domain::shop::{self, ShopEvent};
use reproject::envelope::{self, Decoded};
use reproject::projection::{ChangeLog, Changes, Event, LogicalTime, RowStore};

const EVENTS: usize = 100_000;

// The allocator the `reproject` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn records() -> Vec<Vec<u8>> {
    let history = History::new(HistoryConfig::new(EVENTS as u64, 10_000, 2_000, 42));
    history.take(EVENTS).map(|r| r.value).collect()
}

fn decoded(records: &[Vec<u8>]) -> Vec<Decoded> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| envelope::decode(r, 0, i as i64).expect("valid record"))
        .collect()
}

fn upcast(decoded: &[Decoded]) -> Vec<ShopEvent> {
    let registry = shop::registry().expect("registry");
    decoded
        .iter()
        .map(|d| registry.upcast(&d.type_url, &d.payload).expect("upcasts"))
        .collect()
}

fn stages(c: &mut Criterion) {
    let records = records();
    let decoded = decoded(&records);
    let events = upcast(&decoded);
    let registry = shop::registry().expect("registry");
    let projections = shop::projections();

    let mut group = c.benchmark_group("replay_stages");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);

    group.bench_function("envelope_decode", |b| {
        b.iter(|| {
            for (i, r) in records.iter().enumerate() {
                std::hint::black_box(envelope::decode(r, 0, i as i64).ok());
            }
        })
    });

    // What the replay's readers do: decode every record into the same envelope, reusing its buffers.
    group.bench_function("envelope_decode_reused", |b| {
        let mut into = Decoded::default();
        b.iter(|| {
            for (i, r) in records.iter().enumerate() {
                std::hint::black_box(envelope::decode_into(r, 0, i as i64, &mut into).ok());
            }
        })
    });

    group.bench_function("upcast_chain", |b| {
        b.iter(|| {
            for d in &decoded {
                std::hint::black_box(registry.upcast(&d.type_url, &d.payload).ok());
            }
        })
    });

    group.bench_function("project_all_three", |b| {
        let mut out = Changes::default();
        b.iter(|| {
            for (d, e) in decoded.iter().zip(&events) {
                let event = Event {
                    meta: &d.meta,
                    payload: e,
                };
                for p in &projections {
                    p.apply(&event, &mut out);
                }
                out.clear();
            }
        })
    });

    // The changes of all three projections, folded into fresh stores.
    let changes: Vec<ChangeLog> = projections
        .iter()
        .map(|p| {
            let mut out = Changes::default();
            let mut all = ChangeLog::default();
            for (d, e) in decoded.iter().zip(&events) {
                p.apply(
                    &Event {
                        meta: &d.meta,
                        payload: e,
                    },
                    &mut out,
                );
                all.record(LogicalTime::of(&d.meta), &mut out);
            }
            all
        })
        .collect();
    group.bench_function("fold_changes", |b| {
        b.iter_batched(
            || changes.clone(),
            |changes| {
                for (p, list) in projections.iter().zip(changes) {
                    let mut store = RowStore::new(p.tables().len());
                    for (at, change) in list {
                        store.apply(p.tables(), change, at).expect("folds");
                    }
                    std::hint::black_box(store.approx_bytes());
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
