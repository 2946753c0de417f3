//! The admin API's client side: `atoll deploy`, `atoll apps`, `atoll delete`.
//!
//! A refusal from the site is printed as the site's reason (`{"error": ...}`), not as a trace.

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::signing::{self, DeployParams, DeployRecord};
use crate::{ClientArgs, DeleteArgs, DeployArgs};

#[derive(Debug, Deserialize)]
struct AppInfo {
    name: String,
    version: String,
    size: u64,
    uploaded_at: String,
    /// Absent from sites older than WASI 0.3 support (all their apps are WASI 0.2).
    #[serde(default)]
    world: Option<String>,
    /// The names of the app's variables (absent from sites older than variables support).
    #[serde(default)]
    variables: Vec<String>,
}

pub(crate) struct Site {
    pub(crate) base: String,
    token: Option<String>,
    pub(crate) agent: ureq::Agent,
}

impl Site {
    pub(crate) fn new(args: &ClientArgs) -> Result<Site> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = &args.ca_file {
            let certs = certificates(path)?;
            if certs.is_empty() {
                bail!("no PEM certificate in {}", path.display());
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
            let chain = certificates(cert)?;
            let key = pem(key)?
                .into_iter()
                .find_map(|item| match item {
                    ureq::tls::PemItem::PrivateKey(key) => Some(key),
                    _ => None,
                })
                .with_context(|| format!("no PEM private key in {}", key.display()))?;
            tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)));
        }
        let agent =
            ureq::Agent::config_builder().http_status_as_error(false).tls_config(tls.build()).build().into();
        Ok(Site { base: args.site.trim_end_matches('/').to_owned(), token: args.token.clone(), agent })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn auth<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(token) => request.header("authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// Turns a response into its body, or an error carrying the site's reason.
    pub(crate) fn check(
        &self,
        what: &str,
        response: Result<http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<String> {
        let body = self.check_bytes(what, response)?;
        String::from_utf8(body).context("the site answered with text that is not UTF-8")
    }

    /// [`Site::check`] for a body of any bytes.
    pub(crate) fn check_bytes(
        &self,
        what: &str,
        response: Result<http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Vec<u8>> {
        let mut response = self.answered(what, response)?;
        Ok(response.body_mut().with_config().limit(u64::MAX).read_to_vec().unwrap_or_default())
    }

    /// The response if it is a success (its body unread: it may be streamed), or an error
    /// carrying the site's reason.
    pub(crate) fn answered(
        &self,
        what: &str,
        response: Result<http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<http::Response<ureq::Body>> {
        let mut response = response.with_context(|| format!("cannot reach the site at {}", self.base))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.body_mut().read_to_string().unwrap_or_default();
        let reason = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or(body);
        bail!("{what} failed: the site answered {status}: {reason}")
    }
}

pub fn deploy(args: &DeployArgs) -> Result<()> {
    let wasm = std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let site = Site::new(&args.client)?;
    let params = DeployParams {
        deadline_ms: args.deadline_ms,
        memory_mb: args.memory_mb,
        allow_hosts: (!args.allow_hosts.is_empty()).then(|| args.allow_hosts.join(",")),
        kv_stores: (!args.kv_stores.is_empty()).then(|| args.kv_stores.join(",")),
        vars: signing::Vars(variables(args)?),
        session_cookie: args.session_cookie.then_some(true),
        stale_reads: args.stale_reads.clone(),
        ..Default::default()
    };
    let sent: Vec<String> = params.vars.0.keys().cloned().collect();
    let mut request = site.agent.put(site.url(&format!("/_atoll/apps/{}", args.app)));
    if let Some(ms) = params.deadline_ms {
        request = request.query("deadline_ms", ms.to_string());
    }
    if let Some(mb) = params.memory_mb {
        request = request.query("memory_mb", mb.to_string());
    }
    if let Some(hosts) = &params.allow_hosts {
        request = request.query("allow_hosts", hosts);
    }
    if let Some(labels) = &params.kv_stores {
        request = request.query("kv_stores", labels);
    }
    if params.session_cookie == Some(true) {
        request = request.query("session_cookie", "true");
    }
    if let Some(stale) = &params.stale_reads {
        request = request.query("stale_reads", stale);
    }
    if !params.vars.is_empty() {
        // In a header, not the URL: proxies log URLs.
        request = request.header(signing::VARS_HEADER, signing::encode_vars(&params.vars.0));
    }
    if let Some(key) = &args.client.deploy_key {
        use sha2::Digest;
        let version: String = sha2::Sha256::digest(&wasm).iter().map(|b| format!("{b:02x}")).collect();
        let record = DeployRecord { version: Some(version), size: wasm.len() as u64, ..unsigned(params) };
        request = signed(request, &site, &args.client, key, &args.app, record)?;
    }
    // With `Expect: 100-continue` a refusal (401, 413) arrives before the component is sent.
    let request =
        site.auth(request).header("content-type", "application/wasm").header("expect", "100-continue");
    let body = site.check("deploy", request.send(&wasm[..]))?;
    let info: AppInfo = serde_json::from_str(&body).context("unexpected answer from the site")?;
    if info.variables != sent {
        bail!(
            "{} deployed {} version {} without the variables sent: the site is older than variables \
             support (upgrade every site, then deploy again)",
            site.base,
            info.name,
            info.version
        );
    }
    println!("deployed {} version {} ({} bytes) to {}", info.name, info.version, info.size, site.base);
    for url in app_urls(&site.base, &info.name) {
        println!("  curl {url}");
    }
    Ok(())
}

/// The variables of `--var-file`s, then of `--var`s (a `--var` overrides a file's; a name given
/// twice on the command line, or in one file, is refused). Names are checked here so that a
/// mistake is named before anything is sent; values are never printed.
fn variables(args: &DeployArgs) -> Result<std::collections::BTreeMap<String, String>> {
    let mut vars = std::collections::BTreeMap::new();
    for path in &args.var_files {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut from_file = std::collections::BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            add_variable(&mut from_file, line, &format!("{} line {}", path.display(), n + 1))?;
        }
        vars.extend(from_file);
    }
    let mut given = std::collections::BTreeMap::new();
    for (n, pair) in args.vars.iter().enumerate() {
        add_variable(&mut given, pair, &format!("--var #{}", n + 1))?;
    }
    vars.extend(given);
    Ok(vars)
}

/// Adds one `NAME=VALUE` (from `place`) to `into`.
fn add_variable(
    into: &mut std::collections::BTreeMap<String, String>,
    pair: &str,
    place: &str,
) -> Result<()> {
    let Some((name, value)) = pair.split_once('=') else {
        bail!("{place}: expected NAME=VALUE, found no '='");
    };
    // The name is not quoted: a mistyped line may put a secret where the name goes.
    atoll_runtime::variable_name_rule(name)
        .map_err(|why| anyhow::anyhow!("{place}: the variable name {why}"))?;
    if into.insert(name.to_owned(), value.to_owned()).is_some() {
        bail!("{place}: variable {name:?} is given twice");
    }
    Ok(())
}

/// The ways to call `app` on the site at `base`: by path, and by Host.
fn app_urls(base: &str, app: &str) -> Vec<String> {
    let mut urls = vec![format!("{base}/apps/{app}/")];
    let Ok(uri) = base.parse::<http::Uri>() else { return urls };
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else { return urls };
    let local = host == "localhost" || host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok();
    if local {
        // `*.localhost` is loopback by definition, but not every resolver knows it: send the Host.
        urls.push(format!("-H 'Host: {app}.localhost' {base}/"));
    } else {
        let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
        urls.push(format!("{scheme}://{app}.{host}{port}/"));
    }
    urls
}

/// Whether `app` is deployed on the site at `base` (to wait for a deploy to replicate).
pub fn is_deployed(args: &ClientArgs, app: &str) -> Result<bool> {
    let site = Site::new(args)?;
    let url = site.url(&format!("/_atoll/apps/{app}"));
    let response =
        site.auth(site.agent.get(url)).call().with_context(|| format!("cannot reach {}", site.base))?;
    Ok(response.status() == 200)
}

/// `GET path` at the site (or router) of `args` as JSON, if it answers 200 with JSON.
pub fn get_json(args: &ClientArgs, path: &str) -> Option<serde_json::Value> {
    let site = Site::new(args).ok()?;
    let mut response = site.auth(site.agent.get(site.url(path))).call().ok()?;
    if response.status() != 200 {
        return None;
    }
    serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()
}

pub fn apps(args: &ClientArgs) -> Result<()> {
    let site = Site::new(args)?;
    let body = site.check("listing apps", site.auth(site.agent.get(site.url("/_atoll/apps"))).call())?;
    let apps: Vec<AppInfo> = serde_json::from_str(&body).context("unexpected answer from the site")?;
    if apps.is_empty() {
        println!("no apps deployed on {}", site.base);
        return Ok(());
    }
    println!("{:<24} {:<64} {:>10}  {:<14} UPLOADED", "NAME", "VERSION", "SIZE", "WORLD");
    for app in apps {
        let world = app.world.as_deref().unwrap_or("wasi:http@0.2");
        println!("{:<24} {:<64} {:>10}  {world:<14} {}", app.name, app.version, app.size, app.uploaded_at);
    }
    Ok(())
}

pub fn delete(args: &DeleteArgs) -> Result<()> {
    let site = Site::new(&args.client)?;
    let url = site.url(&format!("/_atoll/apps/{}", args.app));
    let mut request = site.agent.delete(url);
    if let Some(key) = &args.client.deploy_key {
        request = signed(request, &site, &args.client, key, &args.app, unsigned(DeployParams::default()))?;
    }
    site.check("delete", site.auth(request).call())?;
    println!("deleted {} from {}", args.app, site.base);
    Ok(())
}

/// A record of a delete with `params`, signed now (the deploy sets version and size).
fn unsigned(params: DeployParams) -> DeployRecord {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    DeployRecord {
        cluster: String::new(),
        version: None,
        size: 0,
        params,
        signed_at_ms: now.as_millis() as u64,
        key: None,
        signature: None,
    }
}

/// Signs `record` for `app` in the cluster the admin names (`--cluster`) with the key in
/// `key_file`, and adds the signature's headers. The site is asked its cluster only to refuse a
/// mismatch early: a site (or anyone on the way to it) never chooses what is signed.
fn signed<B>(
    request: ureq::RequestBuilder<B>,
    site: &Site,
    args: &ClientArgs,
    key_file: &std::path::Path,
    app: &str,
    mut record: DeployRecord,
) -> Result<ureq::RequestBuilder<B>> {
    let cluster = args.cluster.clone().context(
        "--cluster (or ATOLL_CLUSTER) is needed with --deploy-key: the cluster the deploy is signed for",
    )?;
    let health =
        site.check("asking the site its cluster", site.agent.get(site.url("/_atoll/health")).call())?;
    let theirs = serde_json::from_str::<serde_json::Value>(&health)
        .ok()
        .and_then(|v| v["cluster"].as_str().map(str::to_owned));
    if let Some(theirs) = theirs.filter(|theirs| *theirs != cluster) {
        bail!("{} is in cluster {theirs:?}, not {cluster:?}: nothing was signed or sent", site.base);
    }
    signing::sign_with_file(key_file, &cluster, app, &mut record)?;
    Ok(request
        .header(signing::CLUSTER_HEADER, cluster)
        .header(signing::SIGNED_AT_HEADER, record.signed_at_ms.to_string())
        .header(signing::KEY_HEADER, record.key.unwrap_or_default())
        .header(signing::SIGNATURE_HEADER, record.signature.unwrap_or_default()))
}

/// The certificates of a PEM file.
fn certificates(path: &std::path::Path) -> Result<Vec<ureq::tls::Certificate<'static>>> {
    Ok(pem(path)?
        .into_iter()
        .filter_map(|item| match item {
            ureq::tls::PemItem::Certificate(cert) => Some(cert),
            _ => None,
        })
        .collect())
}

/// The PEM items of a file.
fn pem(path: &std::path::Path) -> Result<Vec<ureq::tls::PemItem<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    ureq::tls::parse_pem(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_for_local_and_named_sites() {
        assert_eq!(
            app_urls("http://127.0.0.1:8080", "hello"),
            ["http://127.0.0.1:8080/apps/hello/", "-H 'Host: hello.localhost' http://127.0.0.1:8080/"]
        );
        assert_eq!(
            app_urls("http://[::1]:8080", "a"),
            ["http://[::1]:8080/apps/a/", "-H 'Host: a.localhost' http://[::1]:8080/"]
        );
        assert_eq!(app_urls("http://edge.example.com:81", "a")[1], "http://a.edge.example.com:81/");
        assert_eq!(
            app_urls("https://edge.example.com", "hello"),
            ["https://edge.example.com/apps/hello/", "https://hello.edge.example.com/"]
        );
    }
}
