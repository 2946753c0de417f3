//! Durable acknowledged writes per second through the atoll-kv API, with 1 and with many
//! concurrent writers (group commit), and reads per second. `cargo bench -p atoll-kv`.

use std::time::{Duration, Instant};

use atoll_kv::{Clock, Namespace, Store, StoreConfig, Write};

fn main() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    let dir = tempfile::tempdir().expect("tempdir");
    println!("durable writes (fsync per commit), temp dir {}", dir.path().display());
    // (writers, max batch, distinct keys per writer): 1000 keys per writer makes most writes
    // create a key; 20 makes most of them overwrite one.
    for (writers, max_batch, keys) in
        [(1, 1024, 1000), (32, 1024, 1000), (32, 1024, 20), (32, 64, 1000), (32, 8, 1000), (256, 1024, 1000)]
    {
        let store = Store::open(
            &dir.path().join(format!("w{writers}-b{max_batch}-k{keys}.redb")),
            StoreConfig { max_batch, ..StoreConfig::new("bench") },
            Clock::system(),
        )
        .expect("store");
        let ns = Namespace::new("bench", "", store.bounds()).expect("ns");
        let run_for = Duration::from_secs(3);
        let (done, latency) = rt.block_on(async {
            let started = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..writers {
                let (store, ns) = (store.clone(), ns.clone());
                tasks.push(tokio::spawn(async move {
                    let (mut n, mut waited) = (0u64, Duration::ZERO);
                    while started.elapsed() < run_for {
                        let key = format!("w{w}-k{}", n % keys);
                        let t = Instant::now();
                        store.write(&ns, key.as_bytes(), Write::Set(vec![7u8; 100])).await.expect("write");
                        waited += t.elapsed();
                        n += 1;
                    }
                    (n, waited)
                }));
            }
            let mut total = (0u64, Duration::ZERO);
            for t in tasks {
                let (n, w) = t.await.expect("join");
                total.0 += n;
                total.1 += w;
            }
            (total.0, total.1 / total.0.max(1) as u32)
        });
        println!(
            "{writers:>4} writers, max batch {max_batch:>4}, {keys:>4} keys each: {:>8.0} acknowledged writes/s, mean latency {:>8.2?}",
            done as f64 / run_for.as_secs_f64(),
            latency
        );
    }
    let store =
        Store::open(&dir.path().join("w32-b1024-k1000.redb"), StoreConfig::new("bench"), Clock::system())
            .expect("store");
    let ns = Namespace::new("bench", "", store.bounds()).expect("ns");
    let started = Instant::now();
    let mut reads = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        let key = format!("w{}-k{}", reads % 32, reads % 1000);
        store.get(&ns, key.as_bytes()).expect("read");
        reads += 1;
    }
    println!("reads (one thread, each its own read transaction): {:.0}/s", reads as f64 / 2.0);
}
