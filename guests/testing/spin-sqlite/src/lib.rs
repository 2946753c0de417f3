//! A Spin app using SQLite (`spin:sqlite`), which Atoll does not provide: its deploy is refused
//! with a message naming the interface.

use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::http_service;

#[http_service]
async fn handle(_request: Request) -> impl IntoResponse {
    match spin_sdk::sqlite::Connection::open_default().await {
        Ok(_) => "opened\n".to_owned(),
        Err(e) => format!("{e:?}\n"),
    }
}
