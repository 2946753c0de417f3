//! Rotating the secrets of a running cluster, site by site, as SECURITY.md tells an operator to:
//! replication and the admin API keep working at every step, and the old secret is refused at
//! the end.

use super::*;
use crate::replication::{WAIT, deploy_kv, mesh, push_entries, try_get};

const NEW_SECRET: &str = "rotated-peer-secret-0123456789";
const NEW_TOKEN: &str = "rotated-admin-token";

/// Restarts `site` (SIGKILL, as a crashed or evicted pod) with `env` instead of its extra
/// environment.
fn restart(mut site: Site, env: &[(&str, &str)]) -> Site {
    site.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    site.kill_and_restart()
}

/// A write at `from` is read at `to` (retried while `from` takes no guest writes yet after a
/// restart).
fn replicates(from: &Site, to: &Site, key: &str) {
    let value = format!("{key}-from-{}", from.name);
    eventually(WAIT, &format!("a write at {}", from.name), || {
        let r = request("PUT", &format!("{}/apps/kv/b/{key}", from.url), &[], Some(value.as_bytes()));
        (r.status == 200).then_some(())
    });
    eventually(WAIT, &format!("{key} to replicate from {} to {}", from.name, to.name), || {
        (try_get(to, key).ok().flatten().as_deref() == Some(value.as_str())).then_some(())
    });
}

fn both_ways(sites: &[Site], step: &str) {
    replicates(&sites[0], &sites[1], &format!("{step}-ab"));
    replicates(&sites[1], &sites[0], &format!("{step}-ba"));
}

/// The status of listing apps at `site` with `token`.
fn list_with(site: &Site, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    request("GET", &format!("{}/_atoll/apps", site.url), &[("authorization", &auth)], None).status
}

#[test]
fn the_peer_secret_and_admin_token_rotate_site_by_site_without_stopping_replication() {
    let mut sites = mesh(&["rot-a", "rot-b"]);
    deploy_kv(&sites);
    both_ways(&sites, "before");

    // 1. Every site accepts the new secret and token beside its own, one site at a time.
    let accept_new = [("ATOLL_PEER_SECRET_ACCEPTED", NEW_SECRET), ("ATOLL_ADMIN_TOKEN_ACCEPTED", NEW_TOKEN)];
    for i in 0..2 {
        let site = sites.remove(i);
        sites.insert(i, restart(site, &accept_new));
        both_ways(&sites, &format!("accept-{i}"));
    }
    assert_eq!((list_with(&sites[0], TOKEN), list_with(&sites[0], NEW_TOKEN)), (200, 200));

    // 2. Every site signs with the new secret and still accepts the old one; between the two
    // restarts one site signs with each.
    let sign_new = [
        ("ATOLL_PEER_SECRET", NEW_SECRET),
        ("ATOLL_PEER_SECRET_ACCEPTED", PEER_SECRET),
        ("ATOLL_ADMIN_TOKEN", NEW_TOKEN),
        ("ATOLL_ADMIN_TOKEN_ACCEPTED", TOKEN),
    ];
    for i in 0..2 {
        let site = sites.remove(i);
        sites.insert(i, restart(site, &sign_new));
        both_ways(&sites, &format!("sign-{i}"));
    }

    // 3. The old secret and token go.
    let only_new = [("ATOLL_PEER_SECRET", NEW_SECRET), ("ATOLL_ADMIN_TOKEN", NEW_TOKEN)];
    for i in 0..2 {
        let site = sites.remove(i);
        sites.insert(i, restart(site, &only_new));
        both_ways(&sites, &format!("only-{i}"));
    }
    for site in &sites {
        assert_eq!(list_with(site, TOKEN), 401, "the old admin token at {}", site.name);
        assert_eq!(list_with(site, NEW_TOKEN), 200, "the new admin token at {}", site.name);
        // A push signed with the old peer secret is refused.
        let old = push_entries(site, vec![], Some(PEER_SECRET), |_| {});
        assert_eq!(old.status, 401, "a push with the old secret at {}: {old:?}", site.name);
        let new = push_entries(site, vec![], Some(NEW_SECRET), |_| {});
        assert_eq!(new.status, 200, "a push with the new secret at {}: {new:?}", site.name);
    }
}

/// `atoll keygen` into `dir`: (key file, public key).
fn keygen(dir: &std::path::Path, name: &str) -> (String, String) {
    let path = dir.join(name).display().to_string();
    let out = atoll(&["keygen", "--out", &path]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (path, String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn the_deploy_key_rotates_site_by_site_and_the_old_key_is_refused_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old_key, old_public) = keygen(dir.path(), "old.key");
    let (new_key, new_public) = keygen(dir.path(), "new.key");
    // Sites that hold only public keys (production's way).
    let trusting = |keys: &[&str]| {
        let list = keys.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(",");
        vec![
            ("ATOLL_ADMIN__DEPLOY_KEY_FILE".to_owned(), String::new()),
            ("ATOLL_ADMIN__DEPLOY_PUBLIC_KEYS".to_owned(), format!("[{list}]")),
        ]
    };
    let env = trusting(&[&old_public]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let a = Site::start_with_env("key-a", &[], Some(crate::replication::FAST), &env);
    let b = Site::start_with_env("key-b", &["--peer", &a.url], Some(crate::replication::FAST), &env);
    let mut sites = vec![a, b];
    let deploy = |site: &Site, app: &str, key: &str| {
        atoll(&["deploy", "--site", &site.url, "--app", app, atoll_test_guests::HELLO, "--deploy-key", key])
    };
    let served_everywhere = |sites: &[Site], app: &str| {
        for site in sites {
            eventually(WAIT, &format!("{app} served at {}", site.name), || {
                (site.get(&format!("/apps/{app}/")).status == 200).then_some(())
            });
        }
    };
    assert!(deploy(&sites[0], "before", &old_key).status.success());
    served_everywhere(&sites, "before");

    // 1. Every site trusts both keys, one restart at a time; deploys signed with either run.
    for i in 0..2 {
        let mut site = sites.remove(i);
        site.env = trusting(&[&old_public, &new_public]);
        sites.insert(i, site.kill_and_restart());
        served_everywhere(&sites, "before");
    }
    assert!(deploy(&sites[1], "by-new", &new_key).status.success());
    assert!(deploy(&sites[0], "by-old", &old_key).status.success());
    served_everywhere(&sites, "by-new");
    served_everywhere(&sites, "by-old");

    // 2. The old key goes: what it signed and the sites applied keeps running; a new deploy
    // signed with it is refused.
    for i in 0..2 {
        let mut site = sites.remove(i);
        site.env = trusting(&[&new_public]);
        sites.insert(i, site.kill_and_restart());
    }
    for app in ["before", "by-new", "by-old"] {
        served_everywhere(&sites, app);
    }
    let refused = deploy(&sites[0], "late", &old_key);
    assert!(!refused.status.success(), "a deploy signed with the removed key was taken");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not in this site's"), "{refused:?}");
    assert!(deploy(&sites[1], "after", &new_key).status.success());
    served_everywhere(&sites, "after");
    assert_eq!(sites[1].get("/apps/late/").status, 404);
}
