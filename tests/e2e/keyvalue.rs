//! Handler state through a real site: counter and todo guests, restarts, SIGKILL durability,
//! isolation between apps, the store format check.

use super::*;

fn post(site: &Site, path: &str, body: &[u8]) -> Response {
    request("POST", &format!("{}{path}", site.url), &[], Some(body))
}

#[test]
fn counter_and_todo_keep_their_state_across_a_kill_and_restart() {
    let site = Site::start("kv-site");
    site.deploy("counter", atoll_test_guests::COUNTER, &[]);
    site.deploy("todo", atoll_test_guests::TODO, &[]);
    for n in 1..=3 {
        assert_eq!(post(&site, "/apps/counter/hits", b"").body, format!("{n}\n"));
    }
    let created = post(&site, "/apps/todo/", br#"{"title":"water the plants"}"#);
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(json(&created.body)["id"], 1);
    assert_eq!(post(&site, "/apps/todo/", br#"{"title":"write docs"}"#).status, 201);
    assert_eq!(post(&site, "/apps/todo/", b"not json").status, 400);
    assert_eq!(json(&site.get("/apps/todo/1").body)["title"], "water the plants");
    assert_eq!(request("DELETE", &format!("{}/apps/todo/1", site.url), &[], None).status, 204);
    assert_eq!(site.get("/apps/todo/1").status, 404);

    let site = site.kill_and_restart();
    assert_eq!(site.get("/apps/counter/hits").body, "3\n");
    let items = json(&site.get("/apps/todo/").body);
    assert_eq!(items.as_array().map(Vec::len), Some(1), "{items}");
    assert_eq!(items[0]["title"], "write docs");
    assert_eq!(post(&site, "/apps/todo/", br#"{"title":"third"}"#).status, 201);
    assert_eq!(json(&site.get("/apps/todo/3").body)["id"], 3, "ids continue after the restart");
}

#[test]
fn every_acknowledged_write_survives_a_sigkill_mid_burst() {
    let site = Site::start("durable");
    site.deploy("counter", atoll_test_guests::COUNTER, &[]);
    site.deploy("todo", atoll_test_guests::TODO, &[]);
    let url = site.url.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two todo clients: each remembers the ids the site acknowledged (201).
    let todo_clients: Vec<_> = (0..2)
        .map(|c| {
            let (url, stop) = (url.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = agent(Duration::from_secs(10));
                let mut acknowledged = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body = format!("{{\"title\":\"client {c} item {}\"}}", acknowledged.len());
                    match agent.post(format!("{url}/apps/todo/")).send(body.as_bytes()) {
                        Ok(mut r) if r.status() == 201 => {
                            let created: serde_json::Value =
                                serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default())
                                    .expect("json");
                            acknowledged.push(created["id"].as_u64().expect("id"));
                        }
                        _ => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (url, stop) = (url.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = agent(Duration::from_secs(10));
                let mut acknowledged = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match agent.post(format!("{url}/apps/counter/client{c}")).send_empty() {
                        Ok(mut r) if r.status() == 200 => {
                            let body = r.body_mut().read_to_string().unwrap_or_default();
                            acknowledged = body.trim().parse().expect("the new total");
                        }
                        _ => break, // the site is gone
                    }
                }
                acknowledged
            })
        })
        .collect();
    // Let a few hundred writes through, then kill the site while the clients are still writing.
    eventually(Duration::from_secs(60), "writes to be acknowledged", || {
        let total: u64 = (0..8)
            .map(|c| site.get(&format!("/apps/counter/client{c}")).body.trim().parse::<u64>().unwrap_or(0))
            .sum();
        (total >= 300).then_some(())
    });
    let site = site.kill_and_restart();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged: Vec<u64> = clients.into_iter().map(|c| c.join().expect("client")).collect();
    for (c, acked) in acknowledged.iter().enumerate() {
        let present: u64 = site.get(&format!("/apps/counter/client{c}")).body.trim().parse().expect("number");
        // Each client has at most one write in flight: committed but not acknowledged.
        assert!(
            present >= *acked && present <= acked + 1,
            "client{c}: acknowledged {acked}, present {present}"
        );
    }
    let acknowledged_ids: Vec<u64> =
        todo_clients.into_iter().flat_map(|c| c.join().expect("client")).collect();
    assert!(!acknowledged_ids.is_empty(), "some todo items were acknowledged before the kill");
    for id in acknowledged_ids {
        assert_eq!(site.get(&format!("/apps/todo/{id}")).status, 200, "acknowledged item {id} is present");
    }
}

#[test]
fn two_apps_never_see_each_others_keys() {
    let site = Site::start("isolation");
    site.deploy("alpha", atoll_test_guests::KV_DRAFT, &[]);
    site.deploy("beta", atoll_test_guests::KV_DRAFT, &[]);
    assert_eq!(
        request("PUT", &format!("{}/apps/alpha/default/secret", site.url), &[], Some(b"a")).status,
        200
    );
    assert_eq!(site.get("/apps/beta/default/secret").status, 404);
    assert_eq!(site.get("/apps/beta/alpha/secret").status, 404);
    assert_eq!(site.get("/apps/beta/default/").body, "");
    assert_eq!(site.get("/apps/alpha/default/secret").body, "a");
}

#[test]
fn a_store_of_an_unknown_format_version_is_refused_at_start() {
    let mut site = Site::start("format");
    let data = site.data.clone();
    let _keep = site._dir.take(); // the data dir outlives the process
    drop(site);
    {
        let db = redb::Database::create(data.join("kv.redb")).expect("db");
        let txn = db.begin_write().expect("txn");
        {
            let meta: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
            txn.open_table(meta)
                .expect("meta")
                .insert("format", 7u64.to_le_bytes().as_slice())
                .expect("insert");
        }
        txn.commit().expect("commit");
    }
    let out = Command::new(ATOLL)
        .args(["site", "--name", "format", "--region", "r", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .env("ATOLL_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("key-value store") && stderr.contains("format version 7"), "{stderr}");
}
