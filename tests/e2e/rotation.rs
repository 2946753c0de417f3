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
