//! The admin API under `/_atoll/`: health (open), and apps (bearer token).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/_atoll/health` | 200 `{status, site, region, apps}` |
//! | GET | `/_atoll/apps` | 200 `[AppInfo]` |
//! | GET | `/_atoll/apps/NAME` | 200 `AppInfo`, 404 |
//! | PUT | `/_atoll/apps/NAME?deadline_ms=&memory_mb=&max_request_body_bytes=&max_response_body_bytes=&allow_hosts=a,b` | 201 `AppInfo` (body: the component) |
//! | DELETE | `/_atoll/apps/NAME` | 204, 404 |
//! | | `/_atoll/apps/NAME/kv...` | the app's key-value data: see `kvapi.rs` |
//! | GET | `/_atoll/backup` | 200 a backup stream (see `backups.rs`) |
//!
//! Errors are `{"error": "reason"}` with 400 (bad component or parameter), 401 (token), 403
//! (a signature that is missing, wrong or by a key the site does not trust), 404, 409 (older
//! than the deploy the site holds), 413 (upload too large) or 500.
//!
//! A PUT or DELETE may carry a deploy signature (`x-atoll-deploy-signed-at`, `-key`,
//! `-signature`: what `atoll deploy --deploy-key` sends); without one, a site holding a deploy
//! key signs it, and any other site refuses it (see [`crate::signing`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atoll_runtime::Version;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Deployed, Site};
use crate::registry::{AppRecord, StoredSettings};
use crate::signing::{self, DeployParams, DeployRecord};

/// Health, the status page and its data, metrics: what every listener serves.
fn status_routes() -> axum::Router<Arc<Site>> {
    axum::Router::new()
        .route("/_atoll/health", get(health))
        .route("/_atoll/router/status", get(router_status))
        .route("/metrics", get(metrics))
        .route("/_atoll/ui", get(crate::ui::page))
        .route("/_atoll/ui/state", get(ui_state))
}

/// Everything: the status routes and the admin API.
pub(super) fn routes() -> axum::Router<Arc<Site>> {
    super::kvapi::routes(status_routes())
        .route("/_atoll/apps", get(list_apps))
        .route("/_atoll/backup", get(super::backups::backup))
        .route("/_atoll/apps/{name}", get(get_app).put(upload).delete(delete_app))
        .route("/_atoll/{*rest}", axum::routing::any(unknown))
}

/// The public listener's when the admin API has its own (`--admin-listen`): the status routes,
/// and no admin API or replication.
pub(super) fn public_routes() -> axum::Router<Arc<Site>> {
    status_routes().route("/_atoll/{*rest}", axum::routing::any(not_here))
}

/// An admin API error: a status and a reason for the person at the other end.
#[derive(Debug)]
pub(crate) struct ApiError(StatusCode, String);

impl ApiError {
    pub(crate) fn new(status: StatusCode, reason: impl Into<String>) -> ApiError {
        ApiError(status, reason.into())
    }

    pub(crate) fn reason(&self) -> &str {
        &self.1
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        tracing::error!("admin request failed: {e:#}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

/// Checks `Authorization: Bearer <token>` in constant time (over SHA-256 digests, so neither
/// the content nor the length of the token leaks through timing) against the admin token and,
/// during a rotation, the other accepted one (both compared, whichever matches).
pub(super) fn authorize(site: &Site, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &site.admin_token else { return Ok(()) };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let given = Sha256::digest(token.as_bytes());
    let other = site.admin_token_accepted.as_deref().unwrap_or(expected);
    let matches: bool = (given.ct_eq(&Sha256::digest(expected.as_bytes()))
        | given.ct_eq(&Sha256::digest(other.as_bytes())))
    .into();
    if token.is_empty() {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing admin token: send Authorization: Bearer $ATOLL_ADMIN_TOKEN",
        ))
    } else if !matches {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid admin token"))
    } else {
        Ok(())
    }
}

/// App names are DNS labels, so that `NAME.<domain>` routing works for every app.
pub(crate) fn validate_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid app name {name:?}: use 1-63 lowercase letters, digits and '-', not at either end"
            ),
        ))
    }
}

#[derive(Serialize)]
struct Health<'a> {
    status: &'static str,
    site: &'a str,
    region: &'a str,
    /// The cluster deploys are signed for (`[admin] cluster`).
    cluster: &'a str,
    apps: usize,
    /// Whether it has finished a sync with a peer (or has none, or waited `[sync] ready_timeout_s`).
    ready: bool,
    /// Why guests may not use the store now (resyncing, clock off, refused by peers), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    store_closed: Option<String>,
    /// The longest deadline of the apps here (or the default): a router waits that long (and a
    /// margin) for a request that cannot be retried elsewhere.
    max_deadline_ms: u64,
    /// Faults `atoll dev` injected into this site (development only).
    #[serde(skip_serializing_if = "Option::is_none")]
    dev_faults: Option<super::faults::SiteFaults>,
}

#[derive(Deserialize)]
struct HealthQuery {
    ready: Option<String>,
}

/// `GET /_atoll/health`: 200 while the site runs (liveness). `?ready`: 503 until the site is
/// ready to take traffic (readiness): it has completed an anti-entropy session with a peer, so it
/// is not serving an empty or stale store after joining or a long outage; a site with no peers is
/// ready at once, and any site after `[sync] ready_timeout_s` (a peer may be down for good).
async fn health(State(site): State<Arc<Site>>, Query(query): Query<HealthQuery>) -> Response {
    let (apps, max_deadline_ms) = {
        let apps = site.apps.read().unwrap_or_else(|e| e.into_inner());
        let longest = apps.values().map(|d| d.app.settings().limits.deadline).max();
        let longest = longest.unwrap_or(site.default_limits.deadline);
        (apps.len(), longest.as_millis() as u64)
    };
    let ready = site.ready();
    let store_closed = site.sync.get().and_then(|n| n.guest_gate());
    let health = Health {
        status: if ready {
            "ok"
        } else if store_closed.is_some() {
            "degraded"
        } else {
            "starting"
        },
        site: &site.name,
        region: &site.region,
        cluster: site.trust.cluster(),
        apps,
        ready,
        store_closed,
        max_deadline_ms,
        dev_faults: site.faults.as_ref().and_then(|f| f.status()),
    };
    let status =
        if query.ready.is_some() && !ready { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, Json(health)).into_response()
}

/// The live routing table as this site sees it (no token, like health).
async fn router_status(State(site): State<Arc<Site>>) -> Response {
    Json(site.router.status_json()).into_response()
}

/// What the status page shows (no token, like health: names and versions of apps are visible).
async fn ui_state(State(site): State<Arc<Site>>, Query(query): Query<crate::ui::StateQuery>) -> Response {
    let mut apps: Vec<(String, String)> = site
        .apps
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(name, d)| (name.clone(), d.record.version.clone()))
        .collect();
    apps.sort();
    let peers = site.sync.get().map(|n| n.peers()).unwrap_or_default();
    let faults = site.faults.as_ref().and_then(|f| f.status()).map(|f| serde_json::json!(f));
    let viewer =
        crate::ui::Viewer { kind: "site", name: &site.name, region: Some(&site.region), peers, apps, faults };
    let mut state = crate::ui::state(&site.router, viewer);
    state["history"] = crate::history::HISTORY.since(query.since.unwrap_or(0));
    Json(state).into_response()
}

/// Prometheus metrics (no token, like health). An app on its own host owns its whole path
/// space, `/metrics` included: such a request goes to the app.
async fn metrics(State(site): State<Arc<Site>>, request: axum::extract::Request) -> Response {
    if super::routing::host_names_an_app(&site, request.headers()) {
        return super::routing::serve_app(State(site), request).await;
    }
    crate::metrics::observe_router(&site.router);
    if let Some(node) = site.sync.get() {
        crate::metrics::observe_sync(node);
    }
    let apps = site.apps.read().unwrap_or_else(|e| e.into_inner()).len();
    metrics::gauge!("atoll_apps_deployed").set(apps as f64);
    metrics::gauge!("atoll_requests_in_flight").set(crate::metrics::in_flight() as f64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render()).into_response()
}

/// What the admin API says about an app.
#[derive(Serialize)]
pub(crate) struct AppInfo {
    name: String,
    version: String,
    size: u64,
    uploaded_at: String,
    /// The `wasi:http` world the component serves (`wasi:http@0.2` or `wasi:http@0.3`).
    world: &'static str,
    /// The settings, without the variables' values.
    settings: StoredSettings,
    /// The names of the app's variables (their values are never shown).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    variables: Vec<String>,
}

impl AppInfo {
    fn new(name: &str, record: &AppRecord, world: atoll_runtime::World) -> AppInfo {
        let at = UNIX_EPOCH + Duration::from_millis(record.uploaded_at_ms);
        AppInfo {
            name: name.to_owned(),
            version: record.version.clone(),
            size: record.size,
            uploaded_at: humantime::format_rfc3339_millis(at).to_string(),
            world: world.as_str(),
            settings: StoredSettings { variables: Default::default(), ..record.settings.clone() },
            variables: record.settings.variables.0.keys().cloned().collect(),
        }
    }
}

async fn list_apps(State(site): State<Arc<Site>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&site, &headers)?;
    let apps = site.apps.read().unwrap_or_else(|e| e.into_inner());
    let mut list: Vec<AppInfo> =
        apps.iter().map(|(name, d)| AppInfo::new(name, &d.record, d.app.world())).collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(list).into_response())
}

async fn get_app(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&site, &headers)?;
    let apps = site.apps.read().unwrap_or_else(|e| e.into_inner());
    let deployed = apps.get(&name).ok_or_else(|| no_such_app(&name))?;
    Ok(Json(AppInfo::new(&name, &deployed.record, deployed.app.world())).into_response())
}

fn no_such_app(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no app named {name:?} is deployed on this site"))
}

/// Signs `record` for `name`, or checks the signature the request carries: the statement a
/// site stores and replicates. Also refuses a deploy older than the one recorded here.
fn sign_or_verify(
    site: &Site,
    name: &str,
    record: &mut DeployRecord,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let given = signing::headers_signature(
        header(signing::SIGNED_AT_HEADER),
        header(signing::KEY_HEADER),
        header(signing::SIGNATURE_HEADER),
    )
    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let recorded =
        super::deploys::record(site, name)?.map_or(0, |r| r.signed_at_ms).max(site.registry.signed_at(name)?);
    match given {
        Some((at, key, signature)) => {
            (record.signed_at_ms, record.key, record.signature) = (at, Some(key), Some(signature));
            // The cluster it says it was signed for (this site's when it does not say).
            if let Some(cluster) = header(signing::CLUSTER_HEADER) {
                record.cluster = cluster.to_owned();
            }
            site.trust.verify(name, record).map_err(|e| ApiError::new(StatusCode::FORBIDDEN, e))?;
        }
        None if site.trust.signs() => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
            record.signed_at_ms = now.max(recorded + 1);
            site.trust.sign(name, record)?;
        }
        None if site.trust.configured() => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this site runs signed deploys only: deploy with --deploy-key FILE (see atoll keygen)",
            ));
        }
        None => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
            record.signed_at_ms = now.max(recorded + 1);
        }
    }
    if record.signed_at_ms <= recorded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "this deploy of {name} was signed at {} ms, not after the one recorded here ({recorded} ms)",
                record.signed_at_ms
            ),
        ));
    }
    Ok(())
}

async fn upload(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    Query(mut params): Query<DeployParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&site, &headers)?;
    validate_name(&name)?;
    if let Some(vars) = headers.get(signing::VARS_HEADER) {
        let vars = vars.to_str().map_err(|_| format!("{} is not base64", signing::VARS_HEADER));
        params.vars = vars
            .and_then(signing::decode_vars)
            .map(signing::Vars)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    }
    let settings = params
        .settings(&site.default_limits, &site.caps)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let max = site.max_upload;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("upload exceeds this site's limit of {max} bytes (admin.max_upload_bytes)"),
        )
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_large());
    }
    let wasm = match Limited::new(body, max as usize).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(e) => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("could not read the upload: {e}")));
        }
    };
    if wasm.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty upload: send the component as the request body",
        ));
    }

    // Compiling takes CPU time: keep it off the threads that serve requests.
    let app = {
        let (runtime, name, wasm, settings) =
            (site.runtime.clone(), name.clone(), wasm.clone(), settings.clone());
        tokio::task::spawn_blocking(move || runtime.load(&name, &wasm, settings))
            .await
            .map_err(|e| anyhow::anyhow!("compile task failed: {e}"))?
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?
    };
    let _guard = site.admin_lock.lock().await;
    let mut deploy = DeployRecord {
        cluster: site.trust.cluster().to_owned(),
        version: Some(app.version().to_string()),
        size: wasm.len() as u64,
        params,
        signed_at_ms: 0,
        key: None,
        signature: None,
    };
    sign_or_verify(&site, &name, &mut deploy, &headers)?;
    let mut stored: crate::registry::StoredSettings = (&settings).into();
    // Checked by `settings` above.
    stored.session = deploy.params.session().unwrap_or_default();
    let record = AppRecord {
        version: app.version().to_string(),
        size: wasm.len() as u64,
        uploaded_at_ms: deploy.signed_at_ms,
        settings: stored,
    };
    {
        let (site, name, record, wasm) = (site.clone(), name.clone(), record.clone(), wasm.clone());
        let at = deploy.signed_at_ms;
        tokio::task::spawn_blocking(move || {
            site.registry.raise_signed_at(&name, at)?;
            site.registry.put(&name, &record, &wasm)
        })
        .await
        .map_err(|e| anyhow::anyhow!("registry task failed: {e}"))??;
    }
    let world = app.world();
    let previous = site
        .apps
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.clone(), Deployed::new(app, record.clone()));
    forget_if_unused(&site, previous);
    super::deploys::publish(&site, &name, &deploy).await?;
    tracing::info!(app = %name, version = %record.version, size = record.size, "deployed");
    Ok((StatusCode::CREATED, Json(AppInfo::new(&name, &record, world))).into_response())
}

async fn delete_app(
    State(site): State<Arc<Site>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&site, &headers)?;
    validate_name(&name)?;
    let _guard = site.admin_lock.lock().await;
    if site.app(&name).is_none() {
        return Err(no_such_app(&name));
    }
    let mut deploy = DeployRecord {
        cluster: site.trust.cluster().to_owned(),
        version: None,
        size: 0,
        params: DeployParams::default(),
        signed_at_ms: 0,
        key: None,
        signature: None,
    };
    sign_or_verify(&site, &name, &mut deploy, &headers)?;
    let existed = {
        let (site, name, at) = (site.clone(), name.clone(), deploy.signed_at_ms);
        tokio::task::spawn_blocking(move || {
            site.registry.raise_signed_at(&name, at)?;
            site.registry.delete(&name)
        })
        .await
        .map_err(|e| anyhow::anyhow!("registry task failed: {e}"))??
    };
    let removed = site.apps.write().unwrap_or_else(|e| e.into_inner()).remove(&name);
    if !existed {
        return Err(no_such_app(&name));
    }
    forget_if_unused(&site, removed);
    super::deploys::publish(&site, &name, &deploy).await?;
    tracing::info!(app = %name, "deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Drops a replaced or deleted version's compiled code unless another app runs it.
pub(super) fn forget_if_unused(site: &Site, gone: Option<Deployed>) {
    let Some(gone) = gone else { return };
    let version: &Version = gone.app.version();
    let in_use =
        site.apps.read().unwrap_or_else(|e| e.into_inner()).values().any(|d| d.app.version() == version);
    if !in_use {
        site.runtime.forget(version);
    }
}

async fn unknown(Path(rest): Path<String>) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no such endpoint /_atoll/{rest}"))
}

async fn not_here(Path(rest): Path<String>) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "/_atoll/{rest} is not served on this listener: the admin API and replication are on the \
             site's admin listener (--admin-listen)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_are_dns_labels() {
        for good in ["hello", "a", "my-app-2", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Hello", "-a", "a-", "a.b", "a_b", "ä", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
