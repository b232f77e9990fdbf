//! Journal benchmarks, driven by `scripts/bench-journal.sh`.
//!
//! `bench_journal append --dir D --record-size 4096 --writers 32 --records 65536`
//!   appends from concurrent writers, each waiting for durability; prints records/s,
//!   MB/s, fsyncs per record and latency percentiles.
//! `bench_journal pit-read --dir D --size-mib 1024 --journal-percent 10 [--drop-caches]`
//!   builds a replica of the given size plus journal writes covering the given share of
//!   it, then reads the raw replica and the point-in-time image sequentially.
//! Output lines are `key=value` pairs so that the script can pick them up.

use std::{
    collections::HashMap,
    fs::OpenOptions,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tandem_journal::{
    Checkpoint, CheckpointId, CheckpointKind, Generation, ImageOptions, Journal, JournalConfig,
    RecordBody, UnixMillis, VolumeId, VolumeSpec,
};

fn args() -> (String, HashMap<String, String>) {
    let mut it = std::env::args().skip(1);
    let mode = it.next().unwrap_or_default();
    let mut map = HashMap::new();
    let mut key: Option<String> = None;
    for a in it {
        if let Some(k) = a.strip_prefix("--") {
            if let Some(prev) = key.replace(k.to_string()) {
                map.insert(prev, "true".to_string());
            }
        } else if let Some(k) = key.take() {
            map.insert(k, a);
        }
    }
    if let Some(k) = key {
        map.insert(k, "true".to_string());
    }
    (mode, map)
}

fn get<T: std::str::FromStr>(m: &HashMap<String, String>, k: &str, default: T) -> T {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let (mode, m) = args();
    let dir = PathBuf::from(
        m.get("dir")
            .cloned()
            .unwrap_or_else(|| "bench-journal".into()),
    );
    match mode.as_str() {
        "append" => append(&dir, &m),
        "pit-read" => pit_read(&dir, &m),
        _ => {
            eprintln!("usage: bench_journal append|pit-read --dir DIR [options]");
            std::process::exit(2);
        }
    }
}

fn fresh(dir: &Path) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).expect("clear bench dir");
    }
    std::fs::create_dir_all(dir).expect("bench dir");
}

fn append(dir: &Path, m: &HashMap<String, String>) {
    let record_size: usize = get(m, "record-size", 4096);
    let writers: u64 = get(m, "writers", 32);
    let records: u64 = get(m, "records", 65536);
    fresh(dir);
    let vol_size = 64u64 << 30;
    let cfg = JournalConfig::new(vec![VolumeSpec {
        id: VolumeId(0),
        size: vol_size,
        replica_path: dir.join("replica.img"),
    }]);
    let journal = Arc::new(Journal::open(dir.join("journal"), cfg).expect("open journal"));
    let data = Bytes::from(vec![0xA5u8; record_size]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let per_writer = records / writers;
    let start = Instant::now();
    let hist = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let j = journal.clone();
            let data = data.clone();
            tasks.push(tokio::spawn(async move {
                let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
                for i in 0..per_writer {
                    let offset =
                        ((w * per_writer + i) * record_size as u64) % (vol_size - (1 << 20));
                    let t = Instant::now();
                    j.append_next(
                        Generation(1),
                        RecordBody::Write {
                            volume: VolumeId(0),
                            offset,
                            data: data.clone(),
                        },
                    )
                    .await
                    .expect("append");
                    h.record(t.elapsed().as_micros() as u64).expect("record");
                }
                h
            }));
        }
        let mut all = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
        for t in tasks {
            all.add(t.await.expect("writer")).expect("merge");
        }
        all
    });
    let secs = start.elapsed().as_secs_f64();
    let stats = journal.stats();
    let n = per_writer * writers;
    println!(
        "journal_append record_size={record_size} writers={writers} records={n} secs={secs:.3} \
         records_per_s={:.0} mb_per_s={:.1} fsyncs={} fsyncs_per_record={:.4} \
         records_per_fsync={:.1} p50_us={} p99_us={}",
        n as f64 / secs,
        (n * record_size as u64) as f64 / secs / 1e6,
        stats.fsyncs,
        stats.fsyncs as f64 / n as f64,
        stats.records_per_fsync,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
    );
    drop(rt);
    Arc::try_unwrap(journal)
        .expect("sole owner")
        .close()
        .expect("close");
    std::fs::remove_dir_all(dir).ok();
}

fn drop_caches() -> bool {
    std::process::Command::new("sync").status().ok();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn pit_read(dir: &Path, m: &HashMap<String, String>) {
    let size = get::<u64>(m, "size-mib", 1024) << 20;
    let percent: u64 = get(m, "journal-percent", 10);
    let chunk: usize = get::<usize>(m, "chunk-kib", 1024) << 10;
    let write_size: u64 = get::<u64>(m, "write-kib", 64) << 10;
    let cold = m.contains_key("drop-caches");
    fresh(dir);
    let replica = dir.join("replica.img");
    // A raw replica full of non-zero data.
    {
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&replica)
            .expect("replica");
        let mut rng = StdRng::seed_from_u64(1);
        let mut block = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < size {
            rng.fill(&mut block[..]);
            let n = (size - off).min(block.len() as u64) as usize;
            f.write_all_at(&block[..n], off).expect("fill replica");
            off += n as u64;
        }
        f.sync_all().expect("sync replica");
    }
    let cfg = JournalConfig::new(vec![VolumeSpec {
        id: VolumeId(0),
        size,
        replica_path: replica.clone(),
    }]);
    let journal = Journal::open(dir.join("journal"), cfg).expect("open journal");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let target = size * percent / 100;
    let mut rng = StdRng::seed_from_u64(2);
    let mut written = 0;
    let data = Bytes::from(vec![0x3Cu8; write_size as usize]);
    rt.block_on(async {
        let mut last = tandem_journal::Seq(0);
        while written < target {
            let offset = rng.gen_range(0..size / write_size) * write_size;
            last = journal
                .submit_next(
                    Generation(1),
                    RecordBody::Write {
                        volume: VolumeId(0),
                        offset,
                        data: data.clone(),
                    },
                )
                .expect("submit");
            written += write_size;
        }
        journal
            .append_next(
                Generation(1),
                RecordBody::Checkpoint(Checkpoint {
                    id: CheckpointId(1),
                    timestamp: UnixMillis::now(),
                    kind: CheckpointKind::Automatic,
                    name: None,
                    vm: None,
                }),
            )
            .await
            .expect("checkpoint");
        let _ = last;
    });
    let stats = journal.stats();
    let mut buf = vec![0u8; chunk];
    // Warm (or drop) caches the same way before each run.
    let prepare = |label: &str| {
        if cold {
            if !drop_caches() {
                eprintln!("cannot drop caches (not root?); {label} runs warm");
            }
        } else {
            let f = std::fs::File::open(&replica).expect("open");
            let mut off = 0;
            let mut b = vec![0u8; 4 << 20];
            while off < size {
                let n = (size - off).min(b.len() as u64) as usize;
                f.read_exact_at(&mut b[..n], off).expect("warm");
                off += n as u64;
            }
        }
    };
    prepare("raw");
    let raw = {
        let f = std::fs::File::open(&replica).expect("open raw");
        let t = Instant::now();
        let mut off = 0;
        while off < size {
            let n = (size - off).min(chunk as u64) as usize;
            f.read_exact_at(&mut buf[..n], off).expect("raw read");
            off += n as u64;
        }
        t.elapsed()
    };
    prepare("image");
    let (open, image, extents) = {
        let t = Instant::now();
        let img = journal
            .open_image(CheckpointId(1), VolumeId(0), &ImageOptions::default())
            .expect("image");
        let open = t.elapsed();
        let t = Instant::now();
        let mut off = 0;
        while off < size {
            let n = (size - off).min(chunk as u64) as usize;
            img.read_at(off, &mut buf[..n]).expect("image read");
            off += n as u64;
        }
        (open, t.elapsed() + open, img.journal_extents())
    };
    let mbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    println!(
        "pit_read size_mib={} journal_percent={percent} journal_bytes={} records={} \
         extents={extents} chunk_kib={} cold={cold} raw_mb_per_s={:.0} image_mb_per_s={:.0} \
         image_open_ms={:.1} ratio={:.2}",
        size >> 20,
        stats.size_bytes,
        stats.appends,
        chunk >> 10,
        mbps(raw),
        mbps(image),
        open.as_secs_f64() * 1e3,
        raw.as_secs_f64() / image.as_secs_f64(),
    );
    journal.close().expect("close");
    std::fs::remove_dir_all(dir).ok();
}
