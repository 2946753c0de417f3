//! What requests may hold of the shared runtime before a guest starts: the bytes of request
//! bodies buffered for guests (all apps together), and each app's share of the instance pool.
//!
//! Both refuse at once rather than queue: a request over either gets a 503 that says which,
//! and the other apps' requests are served meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::HandleError;

/// Bytes of request bodies held for guests, against a cap.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    held: AtomicUsize,
    cap: usize,
}

/// Bytes taken from a [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyBudget {
    pub(crate) fn new(cap: usize) -> BodyBudget {
        BodyBudget { held: AtomicUsize::new(0), cap }
    }

    /// Nothing taken yet.
    pub(crate) fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation { budget: self.clone(), bytes: 0 }
    }
}

impl Reservation {
    /// Takes `more` bytes, unless the budget would pass its cap.
    fn grow(&mut self, more: usize) -> Result<(), HandleError> {
        let budget = &self.budget;
        let taken = budget.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            held.checked_add(more).filter(|&total| total <= budget.cap)
        });
        match taken {
            Ok(_) => {
                self.bytes += more;
                Ok(())
            }
            Err(_) => Err(HandleError::BodyMemoryFull { cap: budget.cap }),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Reads a request body for a guest: at most `limit` bytes (a longer declared length is refused
/// before anything is read), each one counted in `reservation` as it arrives (a declared length
/// is not counted in advance: a client holds only what it has sent).
pub(crate) async fn read_body<B>(
    body: B,
    declared: Option<u64>,
    limit: usize,
    reservation: &mut Reservation,
) -> Result<Bytes, HandleError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || HandleError::RequestBodyTooLarge { limit };
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| HandleError::RequestBody(e.into().to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        len += data.len();
        if len > limit {
            return Err(too_large());
        }
        reservation.grow(data.len())?;
        chunks.push(data);
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => chunks.concat().into(),
    })
}

/// Each app's share of the instance pool, by app name (shared by its versions, so a redeploy
/// does not grant a second share).
#[derive(Debug)]
pub(crate) struct AppShares {
    per_app: usize,
    shares: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Semaphore>>>,
}

impl AppShares {
    pub(crate) fn new(per_app: u32) -> AppShares {
        AppShares { per_app: per_app as usize, shares: Mutex::new(HashMap::new()) }
    }

    /// The share of the app named `name`.
    pub(crate) fn of(&self, name: &Arc<str>) -> Arc<tokio::sync::Semaphore> {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        shares
            .entry(name.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.per_app)))
            .clone()
    }

    /// How many instances one app may hold.
    pub(crate) fn per_app(&self) -> usize {
        self.per_app
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn bodies_count_against_the_budget_until_their_request_ends() {
        let budget = Arc::new(BodyBudget::new(100));
        let mut first = budget.reservation();
        let body = read_body(Full::new(Bytes::from(vec![1u8; 60])), None, 1000, &mut first).await;
        assert_eq!(body.expect("fits").len(), 60);
        let mut second = budget.reservation();
        let refused = read_body(Full::new(Bytes::from(vec![1u8; 60])), None, 1000, &mut second).await;
        assert!(matches!(refused, Err(HandleError::BodyMemoryFull { cap: 100 })), "{refused:?}");
        drop(second);
        // A declared length is not counted in advance (only a longer one than the cap is refused).
        let mut declared = budget.reservation();
        let body = read_body(Full::new(Bytes::from(vec![1u8; 40])), Some(40), 1000, &mut declared).await;
        assert_eq!(body.expect("fits beside the first").len(), 40);
        let refused = read_body(Full::new(Bytes::new()), Some(1001), 1000, &mut budget.reservation()).await;
        assert!(matches!(refused, Err(HandleError::RequestBodyTooLarge { .. })), "{refused:?}");
        drop(declared);
        drop(first);
        let mut third = budget.reservation();
        let body = read_body(Full::new(Bytes::from(vec![1u8; 100])), Some(100), 1000, &mut third).await;
        assert_eq!(body.expect("fits once the first request ended").len(), 100);
        let too_long =
            read_body(Full::new(Bytes::from(vec![1u8; 11])), None, 10, &mut budget.reservation()).await;
        assert!(matches!(too_long, Err(HandleError::RequestBodyTooLarge { limit: 10 })), "{too_long:?}");
    }

    #[test]
    fn versions_of_one_app_share_its_share() {
        let shares = AppShares::new(2);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let first = shares.of(&a).try_acquire_owned().expect("one");
        let second = shares.of(&a).try_acquire_owned().expect("two");
        assert!(shares.of(&a).try_acquire_owned().is_err(), "a third instance of app a");
        assert!(shares.of(&b).try_acquire_owned().is_ok(), "app b has its own share");
        drop((first, second));
        assert!(shares.of(&a).try_acquire_owned().is_ok());
    }
}
