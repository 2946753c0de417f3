//! Variables set at deploy, read through Spin 4's and Spin 2's variables interfaces and
//! `wasi:config`, by WASI 0.3 and 0.2 guests.

use super::*;
use atoll_runtime::Variables;

fn with_variables(pairs: &[(&str, &str)]) -> AppSettings {
    let values = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    AppSettings { variables: Variables::new(values).expect("valid names"), ..AppSettings::default() }
}

async fn get(app: &App, path: &str) -> (u16, String) {
    let request =
        http::Request::get(format!("http://example.com{path}")).body(String::new()).expect("request");
    let response = app.handle(request, "vars-test").await.expect("served");
    (response.status().as_u16(), String::from_utf8_lossy(response.body()).into_owned())
}

#[tokio::test]
async fn a_wasi_0_3_guest_reads_its_variables_through_spin_variables_and_wasi_config() {
    let rt = runtime();
    let settings = with_variables(&[("greeting", "hello, world"), ("api_key", "s3cr3t\nline 2")]);
    let app = load(&rt, atoll_test_guests::SPIN_COUNTER, settings);
    assert_eq!(get(&app, "/_var/greeting").await, (200, "hello, world\n".into()));
    assert_eq!(get(&app, "/_var/api_key").await, (200, "s3cr3t\nline 2\n".into()));
    assert_eq!(get(&app, "/_var/unset").await, (404, "Error::Undefined(\"unset\")\n".into()));
    let (status, body) = get(&app, "/_var/Not_Valid").await;
    assert_eq!(status, 404);
    assert!(body.starts_with("Error::InvalidName("), "{body}");
    assert_eq!(get(&app, "/_config/greeting").await, (200, "hello, world\n".into()));
    assert_eq!(get(&app, "/_config/unset").await, (200, "none\n".into()));
    assert_eq!(
        get(&app, "/_config/Not_Valid").await,
        (200, "none\n".into()),
        "wasi:config: none, as Spin answers"
    );
    // Another app of the same runtime has its own (none).
    let other = load(&rt, atoll_test_guests::SPIN_COUNTER, AppSettings::default());
    assert_eq!(get(&other, "/_var/greeting").await, (404, "Error::Undefined(\"greeting\")\n".into()));
}

#[tokio::test]
async fn a_wasi_0_2_guest_reads_its_variables_through_spin_2_variables_and_wasi_config() {
    let rt = runtime();
    let app = load(&rt, atoll_test_guests::SPIN2, with_variables(&[("greeting", "hi"), ("region", "eu")]));
    assert_eq!(get(&app, "/var/greeting").await, (200, "hi".into()));
    assert_eq!(get(&app, "/var/unset").await, (409, "Error::Undefined(\"unset\")".into()));
    let (status, body) = get(&app, "/var/Bad").await;
    assert_eq!(status, 409);
    assert!(body.starts_with("Error::InvalidName("), "{body}");
    assert_eq!(get(&app, "/config/region").await, (200, "eu".into()));
    assert_eq!(get(&app, "/config/unset").await, (200, "none".into()));
    assert_eq!(get(&app, "/config").await, (200, "greeting=hi\nregion=eu\n".into()));
}
