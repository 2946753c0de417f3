//! TLS between sites and for their clients (`[tls]`): sites replicate over mutual TLS, clients
//! without a certificate from the cluster's CA are refused where replication and the admin API
//! are served, and a site with a certificate from another CA gets nothing.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

use super::*;
use crate::replication::{FAST, WAIT};

/// A certificate authority and the certificates it signed, as PEM files in a temp dir.
struct Ca {
    name: String,
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
        let cert = params.self_signed(&key).expect("self-signed");
        std::fs::write(dir.join(format!("{name}-ca.pem")), cert.pem()).expect("write");
        Ca { name: name.into(), dir: dir.to_owned(), issuer: Issuer::new(params, key) }
    }

    fn file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A certificate for `who`, valid for `atoll-site` (the shared name peers check),
    /// `localhost` and 127.0.0.1, as server and as client: (cert file, key file).
    fn issue(&self, who: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["atoll-site".to_owned(), "localhost".to_owned()]).expect("params");
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        let (cert_file, key_file) =
            (self.dir.join(format!("{who}.pem")), self.dir.join(format!("{who}.key")));
        std::fs::write(&cert_file, cert.pem()).expect("write");
        std::fs::write(&key_file, key.serialize_pem()).expect("write");
        (cert_file, key_file)
    }

    /// A site's `[tls]` with mutual TLS, trusting this CA.
    fn site_config(&self, who: &str) -> String {
        let (cert, key) = self.issue(who);
        format!(
            "{FAST}[tls]\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\nclient_auth = true\nserver_name = \"atoll-site\"\n",
            cert.display().to_string(),
            key.display().to_string(),
            self.file().display().to_string()
        )
    }
}

/// A client trusting `ca`, presenting `client` when given.
fn https_agent(ca: &Path, client: Option<&(PathBuf, PathBuf)>) -> ureq::Agent {
    let pem = |path: &Path| -> Vec<ureq::tls::PemItem<'static>> {
        ureq::tls::parse_pem(&std::fs::read(path).expect("read")).collect::<Result<Vec<_>, _>>().expect("PEM")
    };
    let certs = |path: &Path| -> Vec<ureq::tls::Certificate<'static>> {
        pem(path)
            .into_iter()
            .filter_map(|i| match i {
                ureq::tls::PemItem::Certificate(c) => Some(c),
                _ => None,
            })
            .collect()
    };
    let mut tls =
        ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs(ca)));
    if let Some((cert, key)) = client {
        let key = pem(key)
            .into_iter()
            .find_map(|i| match i {
                ureq::tls::PemItem::PrivateKey(k) => Some(k),
                _ => None,
            })
            .expect("a key");
        tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&certs(cert), key)));
    }
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .tls_config(tls.build())
        .build()
        .into()
}

/// `GET url` with `agent` and the admin token: the status and body, or why the request failed.
fn get(agent: &ureq::Agent, url: &str) -> Result<(u16, String), String> {
    let request = agent.get(url).header("authorization", format!("Bearer {TOKEN}"));
    let mut response = request.call().map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    Ok((status, response.body_mut().read_to_string().unwrap_or_default()))
}

fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    format!("127.0.0.1:{port}")
}

#[test]
fn sites_replicate_over_mutual_tls_and_a_site_from_another_ca_gets_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (good, rogue) = (Ca::new(dir.path(), "good"), Ca::new(dir.path(), "rogue"));
    let (a_admin, b_admin, c_admin) = (free_addr(), free_addr(), free_addr());
    let a_admin_url = format!("https://{a_admin}");
    let a = Site::start_with("tls-a", &["--admin-listen", &a_admin], Some(&good.site_config("a")));
    assert!(a.url.starts_with("https://"), "{}", a.url);
    let b = Site::start_with(
        "tls-b",
        &["--admin-listen", &b_admin, "--peer", &a_admin_url],
        Some(&good.site_config("b")),
    );
    let operator = good.issue("operator");
    let trusting = https_agent(&good.file(), Some(&operator));

    // Deploy over mutual TLS with the CLI; it replicates to b over mutual TLS.
    let (cert, key) = (operator.0.display().to_string(), operator.1.display().to_string());
    let ca = good.file().display().to_string();
    let deploy = |extra: &[&str]| {
        let mut args = vec!["deploy", "--site", &a_admin_url, "--app", "hello", atoll_test_guests::HELLO];
        args.extend_from_slice(extra);
        atoll(&args)
    };
    let out = deploy(&["--ca-file", &ca, "--client-cert", &cert, "--client-key", &key]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (status, body) = eventually(WAIT, "hello to replicate to tls-b", || {
        get(&trusting, &format!("{}/apps/hello/", b.url)).ok().filter(|(s, _)| *s == 200)
    });
    assert_eq!(status, 200, "{body}");
    // Apps on the public listener need no client certificate.
    let public = https_agent(&good.file(), None);
    assert_eq!(get(&public, &format!("{}/apps/hello/", a.url)).map(|r| r.0), Ok(200));
    // A router reaches the sites over TLS too (health checks and forwarded requests), trusting
    // the cluster's CA and checking the shared name.
    let router_config =
        format!("[tls]\nca_file = {:?}\nserver_name = \"atoll-site\"\n", good.file().display().to_string());
    let router = crate::RouterProc::start(&[&a.url, &b.url], Some(&router_config));
    let routed = eventually(WAIT, "the router to serve hello over TLS", || {
        let r = router.get("/apps/hello/", Some("us-east"));
        (r.status == 200).then_some(r)
    });
    assert!(routed.headers["x-atoll-site"].to_str().is_ok_and(|s| s.starts_with("tls-")), "{routed:?}");

    // Where replication and the admin API are served: no client certificate, no entry; no TLS,
    // no answer.
    let out = deploy(&["--ca-file", &ca]);
    assert!(!out.status.success(), "a deploy without a client certificate was taken");
    let refused = get(&public, &format!("{a_admin_url}/_atoll/apps"));
    assert!(refused.is_err(), "{refused:?}");
    let plain = get(&public, &format!("http://{a_admin}/_atoll/health"));
    assert!(plain.is_err() || plain.as_ref().is_ok_and(|(s, _)| *s >= 400), "{plain:?}");
    // A client certificate from another CA is refused like none.
    let forged = https_agent(&good.file(), Some(&rogue.issue("forger")));
    let refused = get(&forged, &format!("{a_admin_url}/_atoll/apps"));
    assert!(refused.is_err(), "{refused:?}");
    // A client that does not trust the site's CA does not talk to it either.
    let stranger = https_agent(&rogue.file(), None);
    assert!(get(&stranger, &format!("{}/apps/hello/", a.url)).is_err());

    // A site with a certificate from another CA (it holds the peer secret and a deploy key, as
    // every e2e site does) is refused by a and refuses a: it never gets the app.
    let c = Site::start_with(
        "tls-rogue",
        &["--admin-listen", &c_admin, "--peer", &a_admin_url],
        Some(&rogue.site_config("c")),
    );
    let rogue_agent = https_agent(&rogue.file(), Some(&rogue.issue("rogue-operator")));
    let error = eventually(WAIT, "the rogue site to report its failure to sync", || {
        let (_, body) = get(&rogue_agent, &format!("https://{c_admin}/_atoll/sync/status")).ok()?;
        let status = json(&body);
        let peers = status["peers"].as_array()?.clone();
        peers.iter().find_map(|p| p["last_error"].as_str().map(str::to_owned))
    });
    assert!(error.to_lowercase().contains("certificate") || error.contains("UnknownIssuer"), "{error}");
    let (status, _) = get(&rogue_agent, &format!("{}/apps/hello/", c.url)).expect("c serves");
    assert_eq!(status, 404, "the rogue site got the app");
    let (_, apps) = get(&trusting, &format!("{a_admin_url}/_atoll/apps")).expect("a answers");
    assert_eq!(json(&apps).as_array().map(Vec::len), Some(1), "{apps}");
}

#[test]
fn a_site_with_tls_never_talks_to_a_peer_in_the_clear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = Ca::new(dir.path(), "good");
    // A plain-HTTP site (it holds the peer secret: a member about to move to TLS, or an
    // impostor), given to a TLS site as a peer.
    let plain = Site::start_with("plain", &[], Some(FAST));
    let tls_site = Site::start_with("tls-only", &["--peer", &plain.url], Some(&good.site_config("t")));
    let agent = https_agent(&good.file(), Some(&good.issue("operator")));
    let error = eventually(WAIT, "the TLS site to report the plain peer", || {
        let (_, body) = get(&agent, &format!("{}/_atoll/sync/status", tls_site.url)).ok()?;
        let status = json(&body);
        let peers = status["peers"].as_array()?.clone();
        peers
            .iter()
            .find(|p| p["url"] == plain.url.as_str())
            .and_then(|p| p["last_error"].as_str().map(str::to_owned))
    });
    assert!(error.contains("scheme") || error.contains("https"), "{error}");
    // Nothing of the TLS site ever reached the plain one.
    let status = json(&plain.get("/_atoll/sync/status").body);
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    assert!(peers.iter().all(|p| p["site"] != "tls-only"), "the plain site heard from the TLS one: {status}");
}
