//! Durable acknowledged writes per second through the atoll-kv API, with 1 and with many
//! concurrent writers (group commit), and reads per second. `cargo bench -p atoll-kv`.

use std::time::{Duration, Instant};

use atoll_kv::{Clock, Namespace, Store, StoreConfig, Write};

fn main() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio");
    let dir = tempfile::tempdir().expect("tempdir");
    println!("durable writes (fsync per commit), temp dir {}", dir.path().display());
    // (writers, max batch, distinct keys per writer): 1000 keys per writer makes the first 32,000
    // writes create a key and the rest overwrite one of many (each write its own page); a
    // billion makes every write create a key; 20 makes most of them overwrite one of a few.
    // `cargo bench -p atoll-kv --bench writes -- 32x1024x1000` runs only the cases named.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    for (writers, max_batch, keys) in [
        (1, 1024, 1000),
        (32, 1024, 1000),
        (32, 1024, 1_000_000_000),
        (32, 1024, 20),
        (32, 64, 1000),
        (32, 8, 1000),
        (256, 1024, 1000),
    ] {
        if !only.is_empty() && !only.contains(&format!("{writers}x{max_batch}x{keys}")) {
            continue;
        }
        let store = Store::open(
            &dir.path().join(format!("w{writers}-b{max_batch}-k{keys}.redb")),
            StoreConfig { max_batch, ..StoreConfig::new("bench") },
            Clock::system(),
        )
        .expect("store");
        let ns = Namespace::new("bench", "", store.bounds()).expect("ns");
        // Long enough for creates to fold the index journal (every 65,536 new keys) a few times.
        let run_for = Duration::from_secs(if keys > 1000 { 10 } else { 3 });
        let (done, latency, longest) = rt.block_on(async {
            let started = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..writers {
                let (store, ns) = (store.clone(), ns.clone());
                tasks.push(tokio::spawn(async move {
                    let (mut n, mut waited, mut longest) = (0u64, Duration::ZERO, Duration::ZERO);
                    while started.elapsed() < run_for {
                        let key = format!("w{w}-k{}", n % keys);
                        let t = Instant::now();
                        store.write(&ns, key.as_bytes(), Write::Set(vec![7u8; 100])).await.expect("write");
                        waited += t.elapsed();
                        longest = longest.max(t.elapsed());
                        n += 1;
                    }
                    (n, waited, longest)
                }));
            }
            let (mut total, mut longest) = ((0u64, Duration::ZERO), Duration::ZERO);
            for t in tasks {
                let (n, w, l) = t.await.expect("join");
                total.0 += n;
                total.1 += w;
                longest = longest.max(l);
            }
            (total.0, total.1 / total.0.max(1) as u32, longest)
        });
        println!(
            "{writers:>4} writers, max batch {max_batch:>4}, {keys:>4} keys each: {:>8.0} acknowledged writes/s, mean latency {:>8.2?}, longest {:>8.2?}",
            done as f64 / run_for.as_secs_f64(),
            latency,
            longest
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
