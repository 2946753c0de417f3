//! What an upload and a replicated deploy record carry, on arbitrary bytes: the record's JSON,
//! its signature, its parameters through the one validation, and the signature headers. Nothing
//! may panic; whatever the validation accepts stays within the site's caps; a record verifies
//! only for the exact statement that was signed.
#![no_main]

use atoll_deploy::{Caps, DEFAULT_CLUSTER, DeployParams, DeployRecord, Trust, headers_signature};
use atoll_runtime::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trust = Trust::new(&[], None, true, DEFAULT_CLUSTER).expect("the dev key");
    let caps = Caps { max_memory_mb: 128, max_body_bytes: 256 << 20 };
    let text = String::from_utf8_lossy(data);

    // A record as a peer would send it.
    if let Ok(record) = serde_json::from_slice::<DeployRecord>(data) {
        let _ = trust.verify("app", &record);
        check(&record.params, &caps);
        // Signed here, it verifies (unless a value holds a line break: no such statement is
        // taken); under another app name, or changed, it does not.
        let mut signed = record.clone();
        if trust.sign("app", &mut signed).is_ok() {
            let canonical = !signed.params.allow_hosts.as_deref().is_some_and(|h| h.chars().any(char::is_control));
            assert_eq!(trust.verify("app", &signed).is_ok(), canonical);
            assert!(trust.verify("other", &signed).is_err());
            let mut changed = signed.clone();
            changed.signed_at_ms = changed.signed_at_ms.wrapping_add(1);
            assert!(trust.verify("app", &changed).is_err());
        }
    }

    // Parameters as an upload's query string gives them.
    if let Ok(params) = serde_json::from_slice::<DeployParams>(data) {
        check(&params, &caps);
    }

    // The signature headers, split from the input.
    let mut parts = text.splitn(3, '\n');
    let _ = headers_signature(parts.next(), parts.next(), parts.next());
});

/// Whatever the validation accepts is within the caps.
fn check(params: &DeployParams, caps: &Caps) {
    if let Ok(settings) = params.settings(&Limits::default(), caps) {
        assert!(settings.limits.deadline <= std::time::Duration::from_secs(3600));
        assert!(settings.limits.max_memory_bytes as u64 <= caps.max_memory_mb << 20);
        assert!(settings.limits.max_request_body as u64 <= caps.max_body_bytes.max(10 << 20));
        assert!(settings.limits.max_response_body as u64 <= caps.max_body_bytes.max(10 << 20));
    }
}
