//! Signed deploys: only a holder of a deploy key decides what code the sites run.
//!
//! A deploy (or a delete) is a [`Statement`]: the app, the component's SHA-256 (or `deleted`),
//! the parameters as the admin gave them, and when it was signed. Its canonical text is signed
//! with an ed25519 **deploy key** (`atoll keygen`); every site holds the public keys it trusts
//! (`[admin] deploy_public_keys`) and verifies a replicated record before it lands in the store,
//! so a holder of the peer secret alone can neither deploy nor delete code, nor change an app's
//! settings, nor bring back an older signed deploy over a newer one. The private key is held by
//! `atoll deploy --deploy-key FILE`, or by a site (`[admin] deploy_key_file`), which then signs
//! the uploads its admin token admits (what `atoll dev` does).
//!
//! The replicated record ([`DeployRecord`]) is the statement's fields and the signature, as JSON
//! in the reserved namespace `_atoll`/`apps`; its settings are the parameters resolved with the
//! receiving site's defaults, through exactly the validation an upload goes through.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use atoll_runtime::{AppSettings, Limits};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// The headers `atoll deploy` and `atoll delete` send a signature in.
pub const SIGNED_AT_HEADER: &str = "x-atoll-deploy-signed-at";
/// The public key (hex) the signature is by.
pub const KEY_HEADER: &str = "x-atoll-deploy-key";
/// The signature (hex).
pub const SIGNATURE_HEADER: &str = "x-atoll-deploy-signature";
/// The header naming the cluster a deploy was signed for.
pub const CLUSTER_HEADER: &str = "x-atoll-deploy-cluster";

/// The cluster a site is in when `[admin] cluster` does not say.
pub const DEFAULT_CLUSTER: &str = "atoll";

/// Checks a cluster name: 1 to 63 lowercase letters, digits and '-'.
pub fn validate_cluster(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("cluster name {name:?}: use 1-63 lowercase letters, digits and '-'"))
    }
}

/// The deploy key `--insecure-dev` sites hold and trust when none is configured: every dev site
/// shares it, so local deploys replicate without setup. Never for production.
const INSECURE_DEV_SEED: [u8; 32] = *b"atoll-insecure-dev-deploy-key-00";

/// Per-app settings a deploy may give; anything left out takes the site's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_response_body_bytes: Option<u64>,
    /// Comma-separated `host`, `host:port` or address entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_hosts: Option<String>,
    /// Comma-separated key-value store labels the app may open through Spin's key-value
    /// interfaces besides `default` (Spin's `key_value_stores`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_stores: Option<String>,
    /// The app's variables (`atoll deploy --var NAME=VALUE`), read through Spin's variables
    /// interfaces and `wasi:config`. Values may be secrets: never shown nor logged.
    #[serde(default, skip_serializing_if = "Vars::is_empty")]
    pub vars: Vars,
    /// Sessions through a cookie (`atoll deploy --session-cookie`): the site sets the session
    /// token as a cookie too, for browsers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_cookie: Option<bool>,
    /// What a site that cannot show a session everything it has seen does once the wait is
    /// over and no site that can is live: `serve` (stale, flagged; the default) or `refuse` (503).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_reads: Option<String>,
}

/// An app's choices for session tokens (see ARCHITECTURE.md, "Sessions").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionPolicy {
    /// The token is set as a cookie too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cookie: bool,
    /// A stale read is answered 503 instead of being served with `x-atoll-stale: 1`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refuse_stale: bool,
}

impl SessionPolicy {
    pub fn is_default(&self) -> bool {
        *self == SessionPolicy::default()
    }
}

/// Variables' names and values; `Debug` shows the names only (values may be secrets), so no
/// `{:?}` of a deploy, its parameters or an app's stored settings can log one.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Vars(pub BTreeMap<String, String>);

impl Vars {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Vars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The most bytes an app's variables may hold, names and values together: they travel in a
/// header of the upload and in every copy of the deploy record.
pub const MAX_VARIABLES_BYTES: usize = 16 << 10;

/// The header `atoll deploy` sends the variables in (base64 of a JSON object), so that no value
/// is in a URL a proxy would log.
pub const VARS_HEADER: &str = "x-atoll-deploy-vars";

/// Variables as [`VARS_HEADER`] carries them: base64 of a JSON object of strings.
pub fn encode_vars(vars: &BTreeMap<String, String>) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(vars).unwrap_or_default())
}

/// The variables in a [`VARS_HEADER`] value, or why it is not one (never quoting a value).
pub fn decode_vars(header: &str) -> Result<BTreeMap<String, String>, String> {
    use base64::Engine;
    let json = base64::engine::general_purpose::STANDARD
        .decode(header.trim())
        .map_err(|_| format!("{VARS_HEADER} is not base64"))?;
    serde_json::from_slice(&json)
        .map_err(|_| format!("{VARS_HEADER} is not a base64 JSON object of string values"))
}

/// A Spin key-value store label: 1 to 64 of `a-z`, `0-9`, `-`, `_`, starting with a letter.
fn valid_store_label(label: &str) -> bool {
    (1..=64).contains(&label.len())
        && label.starts_with(|c: char| c.is_ascii_lowercase())
        && label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// The most a deadline may be (an hour).
const MAX_DEADLINE_MS: u64 = 3_600_000;

impl DeployParams {
    /// The settings these parameters give on a site with `defaults` (and the site's caps), or why
    /// they are refused. The one validation for an upload and a replicated record.
    pub fn settings(&self, defaults: &Limits, caps: &Caps) -> Result<AppSettings, String> {
        // Not a runtime setting, but checked wherever the others are (an upload, a record).
        self.session()?;
        let mut limits = defaults.clone();
        if let Some(ms) = self.deadline_ms {
            if !(1..=MAX_DEADLINE_MS).contains(&ms) {
                return Err(format!("deadline_ms must be between 1 and {MAX_DEADLINE_MS}"));
            }
            limits.deadline = Duration::from_millis(ms);
        }
        if let Some(mb) = self.memory_mb {
            if !(1..=caps.max_memory_mb).contains(&mb) {
                return Err(format!(
                    "memory_mb must be between 1 and {} (the instance pool's memory per instance)",
                    caps.max_memory_mb
                ));
            }
            limits.max_memory_bytes = (mb << 20) as usize;
        }
        let body_cap = |name: &str, v: u64| {
            if v > caps.max_body_bytes {
                Err(format!("{name} must be at most {} bytes", caps.max_body_bytes))
            } else {
                Ok(v as usize)
            }
        };
        if let Some(bytes) = self.max_request_body_bytes {
            limits.max_request_body = body_cap("max_request_body_bytes", bytes)?;
        }
        if let Some(bytes) = self.max_response_body_bytes {
            limits.max_response_body = body_cap("max_response_body_bytes", bytes)?;
        }
        if self.allow_hosts.as_deref().is_some_and(|h| h.chars().any(char::is_control)) {
            return Err("allow_hosts must not hold control characters".into());
        }
        let allowed_hosts: Vec<String> = self
            .allow_hosts
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        for host in &allowed_hosts {
            atoll_runtime::AllowedHost::parse(host).map_err(|e| format!("allow_hosts: {e}"))?;
        }
        let mut kv_stores: Vec<String> = Vec::new();
        for label in
            self.kv_stores.as_deref().unwrap_or("").split(',').map(str::trim).filter(|l| !l.is_empty())
        {
            if !valid_store_label(label) {
                return Err(format!(
                    "kv_stores: {label:?} is not a store label (1 to 64 lowercase letters, digits, '-' and '_', \
                     starting with a letter)"
                ));
            }
            if label != "default" && !kv_stores.iter().any(|l| l == label) {
                kv_stores.push(label.to_owned());
            }
        }
        let size: usize = self.vars.0.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > MAX_VARIABLES_BYTES {
            return Err(format!(
                "the variables hold {size} bytes (names and values); at most {MAX_VARIABLES_BYTES} are allowed"
            ));
        }
        let variables = atoll_runtime::Variables::new(self.vars.0.clone())?;
        Ok(AppSettings { limits, allowed_hosts, kv_stores, variables })
    }

    /// The app's session choices, or why they are not valid.
    pub fn session(&self) -> Result<SessionPolicy, String> {
        let refuse_stale = match self.stale_reads.as_deref() {
            None | Some("serve") => false,
            Some("refuse") => true,
            Some(other) => {
                return Err(format!(
                    "stale_reads must be serve or refuse, not {:?}",
                    other.chars().take(32).collect::<String>()
                ));
            }
        };
        Ok(SessionPolicy { cookie: self.session_cookie == Some(true), refuse_stale })
    }

    /// The canonical text of the parameters (sorted `name=value` lines of those given).
    fn canonical(&self) -> String {
        let mut out = String::new();
        let mut line = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                out.push_str(&format!("{name}={v}\n"));
            }
        };
        line("allow_hosts", self.allow_hosts.clone());
        line("deadline_ms", self.deadline_ms.map(|v| v.to_string()));
        line("kv_stores", self.kv_stores.clone());
        line("max_request_body_bytes", self.max_request_body_bytes.map(|v| v.to_string()));
        line("max_response_body_bytes", self.max_response_body_bytes.map(|v| v.to_string()));
        line("memory_mb", self.memory_mb.map(|v| v.to_string()));
        line("session_cookie", self.session_cookie.map(|v| v.to_string()));
        line("stale_reads", self.stale_reads.clone());
        // JSON: escaped, so a value never spans lines; a map, so sorted by name.
        line("vars", (!self.vars.is_empty()).then(|| serde_json::to_string(&self.vars).unwrap_or_default()));
        out
    }
}

/// What a site allows any app at most.
#[derive(Debug, Clone)]
pub struct Caps {
    /// The instance pool's memory per instance, in MiB.
    pub max_memory_mb: u64,
    /// A request or response body buffered for a guest.
    pub max_body_bytes: u64,
}

/// What an admin signed: in this cluster, this app runs this component with these parameters
/// (or is deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement<'a> {
    /// The cluster it holds in: a record signed for staging is refused in production, even with
    /// one deploy key for both.
    pub cluster: &'a str,
    pub app: &'a str,
    /// The component's SHA-256 (hex); `None`: the app is deleted.
    pub version: Option<&'a str>,
    /// The component's size in bytes (0 for a delete).
    pub size: u64,
    pub params: &'a DeployParams,
    pub signed_at_ms: u64,
}

impl Statement<'_> {
    /// The bytes signed: a versioned, line-based text no two statements share.
    pub fn text(&self) -> String {
        format!(
            "atoll-deploy-v2\ncluster={}\napp={}\nversion={}\nsize={}\nsigned_at_ms={}\n{}",
            self.cluster,
            self.app,
            self.version.unwrap_or("deleted"),
            self.size,
            self.signed_at_ms,
            self.params.canonical()
        )
    }
}

/// A deploy as replicated: the statement's fields and its signature, if it has one (only a
/// site that does not replicate records unsigned deploys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRecord {
    /// The cluster it was signed for.
    #[serde(default)]
    pub cluster: String,
    /// The component's SHA-256 (hex); `None`: the app is deleted.
    pub version: Option<String>,
    /// Its size in bytes (0 for a delete).
    pub size: u64,
    pub params: DeployParams,
    pub signed_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl DeployRecord {
    pub fn statement<'a>(&'a self, app: &'a str) -> Statement<'a> {
        Statement {
            cluster: &self.cluster,
            app,
            version: self.version.as_deref(),
            size: self.size,
            params: &self.params,
            signed_at_ms: self.signed_at_ms,
        }
    }
}

/// Whether `version` is a SHA-256 in lowercase hex (what a version is; checked before it is
/// used in a path or a URL).
pub fn is_version(version: &str) -> bool {
    version.len() == 64 && version.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The deploy keys a site trusts, and the one it signs with, if it holds one.
#[derive(Clone)]
pub struct Trust {
    keys: Vec<VerifyingKey>,
    signer: Option<SigningKey>,
    /// The cluster this site is in: what records must be signed for.
    cluster: String,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("keys", &self.keys.iter().map(|k| hex(k.as_bytes())).collect::<Vec<_>>())
            .field("signs", &self.signer.is_some())
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl Trust {
    /// Trusts `public_keys` (hex) for deploys to `cluster`, and signs with the key in `key_file`
    /// if given (trusting its public key too). `insecure_dev` with neither: the shared
    /// development key.
    pub fn new(
        public_keys: &[String],
        key_file: Option<&Path>,
        insecure_dev: bool,
        cluster: &str,
    ) -> Result<Trust> {
        validate_cluster(cluster).map_err(|e| anyhow::anyhow!("admin.cluster: {e}"))?;
        let mut keys = public_keys
            .iter()
            .map(|k| parse_public(k).with_context(|| format!("admin.deploy_public_keys: {k:?}")))
            .collect::<Result<Vec<_>>>()?;
        let mut signer = key_file.filter(|p| !p.as_os_str().is_empty()).map(read_key).transpose()?;
        if keys.is_empty() && signer.is_none() && insecure_dev {
            signer = Some(SigningKey::from_bytes(&INSECURE_DEV_SEED));
        }
        if let Some(s) = &signer
            && !keys.contains(&s.verifying_key())
        {
            keys.push(s.verifying_key());
        }
        Ok(Trust { keys, signer, cluster: cluster.to_owned() })
    }

    /// The cluster this site is in.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Whether this site knows any deploy key (then every replicated record must be signed).
    pub fn configured(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether this site signs the deploys its admin token admits.
    pub fn signs(&self) -> bool {
        self.signer.is_some()
    }

    /// Signs `record`'s statement for `app` in this site's cluster with this site's key.
    pub fn sign(&self, app: &str, record: &mut DeployRecord) -> Result<()> {
        let signer = self.signer.as_ref().context("this site holds no deploy key")?;
        record.cluster = self.cluster.clone();
        let signature = signer.sign(record.statement(app).text().as_bytes());
        record.key = Some(hex(signer.verifying_key().as_bytes()));
        record.signature = Some(hex(&signature.to_bytes()));
        Ok(())
    }

    /// Checks that `record` is signed, for `app` in this site's cluster, by a trusted key.
    pub fn verify(&self, app: &str, record: &DeployRecord) -> Result<(), String> {
        // A line break in a value would let two statements share one text (and so one
        // signature): no such statement is signed or taken.
        if record.params.allow_hosts.as_deref().is_some_and(|h| h.chars().any(char::is_control)) {
            return Err("the deploy's allow_hosts holds control characters".into());
        }
        if record.params.kv_stores.as_deref().is_some_and(|h| h.chars().any(char::is_control)) {
            return Err("the deploy's kv_stores holds control characters".into());
        }
        if record.params.stale_reads.as_deref().is_some_and(|h| h.chars().any(char::is_control)) {
            return Err("the deploy's stale_reads holds control characters".into());
        }
        let (Some(key), Some(signature)) = (&record.key, &record.signature) else {
            return Err("the deploy is not signed".into());
        };
        if record.cluster != self.cluster {
            return Err(format!(
                "the deploy is signed for cluster {:?}; this site is in cluster {:?} ([admin] cluster)",
                record.cluster, self.cluster
            ));
        }
        let key = parse_public(key).map_err(|e| format!("the deploy's key: {e:#}"))?;
        if !self.keys.contains(&key) {
            return Err(format!(
                "the deploy is signed by {}, which is not in this site's admin.deploy_public_keys",
                hex(key.as_bytes())
            ));
        }
        let signature: [u8; 64] = unhex(signature)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| "the deploy's signature is not 64 bytes of hex".to_owned())?;
        key.verify_strict(record.statement(app).text().as_bytes(), &Signature::from_bytes(&signature))
            .map_err(|_| "the deploy's signature does not match its content".to_owned())
    }
}

/// Signs `record`'s statement for `app` in `cluster` with the key in `key_file` (the CLI's side).
pub fn sign_with_file(key_file: &Path, cluster: &str, app: &str, record: &mut DeployRecord) -> Result<()> {
    let trust = Trust { keys: vec![], signer: Some(read_key(key_file)?), cluster: cluster.to_owned() };
    trust.sign(app, record)
}

/// `atoll keygen`: a new deploy key, written to `out` (readable by its owner only); returns the
/// public key (hex).
pub fn keygen(out: &Path) -> Result<String> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(out)
        .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
    std::io::Write::write_all(&mut file, format!("{}\n", hex(&seed)).as_bytes())?;
    Ok(hex(key.verifying_key().as_bytes()))
}

fn read_key(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the deploy key {}", path.display()))?;
    let seed: [u8; 32] = unhex(text.trim()).and_then(|b| b.try_into().ok()).with_context(|| {
        format!("{} is not a deploy key (64 hex characters: atoll keygen)", path.display())
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

fn parse_public(text: &str) -> Result<VerifyingKey> {
    let bytes: [u8; 32] = unhex(text.trim())
        .and_then(|b| b.try_into().ok())
        .context("a deploy public key is 64 hex characters (printed by atoll keygen)")?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| anyhow::anyhow!("not an ed25519 public key"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len() / 2).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()).collect()
}

/// Refuses a signature header set that is partly there.
pub fn headers_signature(
    signed_at: Option<&str>,
    key: Option<&str>,
    signature: Option<&str>,
) -> Result<Option<(u64, String, String)>> {
    match (signed_at, key, signature) {
        (None, None, None) => Ok(None),
        (Some(at), Some(key), Some(sig)) => {
            let at = at.parse().with_context(|| format!("{SIGNED_AT_HEADER} is not a number"))?;
            Ok(Some((at, key.to_owned(), sig.to_owned())))
        }
        _ => bail!("a signed deploy sends {SIGNED_AT_HEADER}, {KEY_HEADER} and {SIGNATURE_HEADER} together"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: &str) -> DeployRecord {
        DeployRecord {
            cluster: DEFAULT_CLUSTER.into(),
            version: Some(version.to_owned()),
            size: 10,
            params: DeployParams { deadline_ms: Some(500), ..Default::default() },
            signed_at_ms: 1_000,
            key: None,
            signature: None,
        }
    }

    #[test]
    fn a_signature_holds_for_its_app_content_and_trusted_key_only() {
        let admin = Trust::new(&[], None, true, DEFAULT_CLUSTER).expect("trust");
        let v = "a".repeat(64);
        let mut r = record(&v);
        admin.sign("hello", &mut r).expect("sign");
        assert_eq!(admin.verify("hello", &r), Ok(()));
        // Another app, a changed parameter, version, time: refused.
        assert!(admin.verify("other", &r).is_err());
        for change in [
            |r: &mut DeployRecord| r.params.deadline_ms = Some(501),
            |r: &mut DeployRecord| r.params.allow_hosts = Some("evil.example".into()),
            |r: &mut DeployRecord| r.params.kv_stores = Some("secrets".into()),
            |r: &mut DeployRecord| {
                r.params.vars.0.insert("api_url".into(), "https://evil.example".into());
            },
            |r: &mut DeployRecord| r.version = None,
            |r: &mut DeployRecord| r.signed_at_ms += 1,
            |r: &mut DeployRecord| r.size += 1,
        ] {
            let mut changed = r.clone();
            change(&mut changed);
            assert!(admin.verify("hello", &changed).expect_err("refused").contains("does not match"));
        }
        // Unsigned, or signed by a key the site does not trust: refused.
        assert!(admin.verify("hello", &record(&v)).expect_err("refused").contains("not signed"));
        let stranger = Trust {
            keys: vec![],
            signer: Some(SigningKey::from_bytes(&[7; 32])),
            cluster: DEFAULT_CLUSTER.into(),
        };
        let mut forged = record(&v);
        stranger.sign("hello", &mut forged).expect("sign");
        assert!(admin.verify("hello", &forged).expect_err("refused").contains("not in this site's"));
        // A site that trusts only public keys verifies but cannot sign.
        let public = hex(SigningKey::from_bytes(&INSECURE_DEV_SEED).verifying_key().as_bytes());
        let verifier = Trust::new(&[public], None, false, DEFAULT_CLUSTER).expect("trust");
        assert_eq!(verifier.verify("hello", &r), Ok(()));
        assert!(verifier.sign("hello", &mut record(&v)).is_err());
        // Signed with the same key for another cluster (staging): refused here, and a record
        // relabelled to this cluster does not match its signature.
        let staging = Trust::new(&[], None, true, "staging").expect("trust");
        let mut theirs = record(&v);
        staging.sign("hello", &mut theirs).expect("sign");
        assert!(admin.verify("hello", &theirs).expect_err("refused").contains("cluster"));
        theirs.cluster = DEFAULT_CLUSTER.into();
        assert!(admin.verify("hello", &theirs).expect_err("refused").contains("does not match"));
        assert!(Trust::new(&[], None, true, "Not A Name").is_err());
    }

    #[test]
    fn parameters_are_validated_as_at_upload() {
        let defaults = Limits::default();
        let caps = Caps { max_memory_mb: 64, max_body_bytes: 1 << 20 };
        let p = |f: fn(&mut DeployParams)| {
            let mut p = DeployParams::default();
            f(&mut p);
            p.settings(&defaults, &caps)
        };
        assert!(p(|_| {}).is_ok());
        assert!(
            p(|p| p.stale_reads = Some("sometimes".into())).expect_err("refused").contains("stale_reads")
        );
        let session = |f: fn(&mut DeployParams)| {
            let mut p = DeployParams::default();
            f(&mut p);
            p.session().expect("valid")
        };
        assert_eq!(session(|_| {}), SessionPolicy::default());
        assert_eq!(
            session(|p| {
                p.session_cookie = Some(true);
                p.stale_reads = Some("refuse".into());
            }),
            SessionPolicy { cookie: true, refuse_stale: true }
        );
        assert!(p(|p| p.deadline_ms = Some(u64::MAX)).expect_err("refused").contains("deadline_ms"));
        assert!(p(|p| p.deadline_ms = Some(0)).is_err());
        assert!(p(|p| p.memory_mb = Some(65)).expect_err("refused").contains("memory_mb"));
        assert!(p(|p| p.memory_mb = Some(u64::MAX)).is_err());
        assert!(p(|p| p.max_request_body_bytes = Some(u64::MAX)).is_err());
        assert!(p(|p| p.allow_hosts = Some("a.example:99999".into())).is_err());
        assert!(p(|p| p.kv_stores = Some("ok,Not-OK".into())).expect_err("refused").contains("kv_stores"));
        assert!(p(|p| p.kv_stores = Some("9lives".into())).is_err());
        let vars = |pairs: &[(&str, &str)]| DeployParams {
            vars: Vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        };
        let refused = vars(&[("api_key", "s3cr3t"), ("Bad", "s3cr3t")]).settings(&defaults, &caps);
        let refused = refused.expect_err("a bad name is refused");
        assert!(
            refused.contains("\"Bad\"") && !refused.contains("s3cr3t"),
            "names the name, not the value: {refused}"
        );
        let big = "x".repeat(MAX_VARIABLES_BYTES);
        assert!(vars(&[("big", &big)]).settings(&defaults, &caps).expect_err("too big").contains("bytes"));
        let set =
            vars(&[("api_key", "s3cr3t\nline 2"), ("n", "")]).settings(&defaults, &caps).expect("valid");
        assert_eq!(set.variables.values().get("api_key").map(String::as_str), Some("s3cr3t\nline 2"));
        let labels = p(|p| p.kv_stores = Some("sessions, default,sessions,cache_2".into())).expect("valid");
        assert_eq!(labels.kv_stores, ["sessions", "cache_2"], "default is implied, duplicates dropped");
        assert!(is_version(&"0".repeat(64)) && !is_version("../x") && !is_version(&"A".repeat(64)));
    }

    mod arbitrary {
        //! What `fuzz/fuzz_targets/upload.rs` checks, as a property test that CI runs (the fuzz
        //! target needs nightly and cargo-fuzz).
        use super::*;
        use proptest::prelude::*;

        fn caps() -> Caps {
            Caps { max_memory_mb: 128, max_body_bytes: 256 << 20 }
        }

        fn within_caps(params: &DeployParams) {
            if let Ok(settings) = params.settings(&Limits::default(), &caps()) {
                assert!(settings.limits.deadline <= Duration::from_millis(MAX_DEADLINE_MS));
                assert!(settings.limits.max_memory_bytes as u64 <= caps().max_memory_mb << 20);
                assert!(settings.limits.max_request_body as u64 <= caps().max_body_bytes);
                assert!(settings.limits.max_response_body as u64 <= caps().max_body_bytes);
                assert!(settings.kv_stores.iter().all(|l| valid_store_label(l) && l != "default"));
            }
        }

        proptest! {
            #[test]
            fn any_record_bytes_are_refused_or_checked_without_panicking(data in proptest::collection::vec(any::<u8>(), 0..400)) {
                let trust = Trust::new(&[], None, true, DEFAULT_CLUSTER).expect("dev key");
                if let Ok(record) = serde_json::from_slice::<DeployRecord>(&data) {
                    let _ = trust.verify("app", &record);
                    within_caps(&record.params);
                }
                let text = String::from_utf8_lossy(&data);
                let mut parts = text.splitn(3, '\n');
                let _ = headers_signature(parts.next(), parts.next(), parts.next());
            }

            #[test]
            fn any_parameters_stay_within_the_caps_and_sign_only_their_own_statement(
                deadline_ms in proptest::option::of(any::<u64>()),
                memory_mb in proptest::option::of(any::<u64>()),
                request in proptest::option::of(any::<u64>()),
                response in proptest::option::of(any::<u64>()),
                allow_hosts in proptest::option::of("[a-z0-9.:,\n=]{0,40}"),
                kv_stores in proptest::option::of("[a-z0-9_,\n=]{0,20}"),
                vars in proptest::collection::btree_map("[a-z_\n=]{0,6}", "[a-z\n=\"{}]{0,12}", 0..3),
                signed_at_ms in any::<u64>(),
            ) {
                let params = DeployParams {
                    deadline_ms,
                    memory_mb,
                    max_request_body_bytes: request,
                    max_response_body_bytes: response,
                    allow_hosts,
                    kv_stores,
                    vars: Vars(vars),
                    session_cookie: None,
                    stale_reads: None,
                };
                within_caps(&params);
                let trust = Trust::new(&[], None, true, DEFAULT_CLUSTER).expect("dev key");
                let mut record = DeployRecord {
                    cluster: String::new(),
                    version: None,
                    size: 0,
                    params,
                    signed_at_ms,
                    key: None,
                    signature: None,
                };
                trust.sign("app", &mut record).expect("signs");
                prop_assert!(trust.verify("other", &record).is_err());
                let valid = !record.params.allow_hosts.as_deref().is_some_and(|h| h.contains('\n'))
                    && !record.params.kv_stores.as_deref().is_some_and(|h| h.contains('\n'));
                prop_assert_eq!(trust.verify("app", &record).is_ok(), valid);
                let mut later = record.clone();
                later.signed_at_ms = later.signed_at_ms.wrapping_add(1);
                prop_assert!(trust.verify("app", &later).is_err());
            }
        }
    }
}
