//! Application variables: names and values set at deploy (`atoll deploy --var NAME=VALUE`),
//! read by the guest through the three interfaces Spin apps use: `spin:variables@3.0.0` (Spin 4,
//! async: WASI 0.3 guests), `fermyon:spin/variables@2.0.0` (spin-sdk 2–5) and
//! `wasi:config/store@0.2.0-draft-2024-09-27`.
//!
//! Spin's semantics: a name must be lowercase ASCII letters, digits and single underscores,
//! starting with a letter and ending with a letter or digit, else `invalid-name`; a valid name
//! not set is `undefined` (`wasi:config` answers `none` for both, as Spin does). Values may be
//! secrets: they are never formatted (`Debug` shows the names only).

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::{Accessor, HasData, Linker};

/// An app's variables. Cheap to clone (one per request).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Variables(Arc<BTreeMap<String, String>>);

impl std::fmt::Debug for Variables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Variables").field("names", &self.0.keys().collect::<Vec<_>>()).finish()
    }
}

impl Variables {
    /// Variables from names and values, or why a name is refused.
    pub fn new(values: BTreeMap<String, String>) -> Result<Variables, String> {
        for name in values.keys() {
            check_name(name)?;
        }
        Ok(Variables(Arc::new(values)))
    }

    /// The names and values, by name.
    pub fn values(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// The value of `name`, or why there is none.
    fn lookup(&self, name: &str) -> Result<&str, Missing> {
        check_name(name).map_err(Missing::InvalidName)?;
        self.0.get(name).map(String::as_str).ok_or_else(|| Missing::Undefined(name.to_owned()))
    }
}

/// Why a guest's variable has no value.
enum Missing {
    InvalidName(String),
    Undefined(String),
}

/// Checks a variable name against Spin's rule; the error names the name, never a value.
pub fn check_name(name: &str) -> Result<(), String> {
    name_rule(name).map_err(|why| format!("variable name {name:?} {why}"))
}

/// Which part of Spin's rule `name` breaks, if any (without quoting it: what a user typed as a
/// name may be a value, such as a token given without `NAME=`).
pub fn name_rule(name: &str) -> Result<(), &'static str> {
    Err(if name.is_empty() {
        "is empty"
    } else if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        "may hold only lowercase ASCII letters, digits and '_'"
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        "must start with a lowercase letter"
    } else if name.ends_with('_') {
        "must end with a letter or a digit"
    } else if name.contains("__") {
        "must not hold two '_' in a row"
    } else {
        return Ok(());
    })
}

mod spin3 {
    wasmtime::component::bindgen!({
        inline: "package atoll:host; world spin-variables { import spin:variables/variables@3.0.0; }",
        path: "../../wit/spin-variables-3.0.0",
        imports: { default: trappable },
    });
}

mod spin2 {
    wasmtime::component::bindgen!({
        inline: "package atoll:host; world spin-variables { import fermyon:spin/variables@2.0.0; }",
        path: "../../wit/fermyon-spin-2.0.0",
        imports: { default: trappable },
    });
}

mod config {
    wasmtime::component::bindgen!({
        path: "../../wit/wasi-config-0.2.0-draft-2024-09-27",
        world: "wasi:config/imports",
        imports: { default: trappable },
    });
}

/// The view the generated host traits are implemented on: the request's app's variables.
pub(crate) struct VarsView<'a>(pub(crate) &'a Variables);

/// Marker for `add_to_linker`.
pub(crate) struct HasVars;

impl HasData for HasVars {
    type Data<'a> = VarsView<'a>;
}

/// Adds `fermyon:spin/variables@2.0.0` and `wasi:config/store` (synchronous: any engine).
pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> VarsView<'_>,
) -> wasmtime::Result<()> {
    spin2::fermyon::spin::variables::add_to_linker::<T, HasVars>(linker, view)?;
    config::wasi::config::store::add_to_linker::<T, HasVars>(linker, view)
}

/// Adds `spin:variables@3.0.0` (async: an engine with the component model's async support).
pub(crate) fn add_async_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> VarsView<'_>,
) -> wasmtime::Result<()> {
    spin3::spin::variables::variables::add_to_linker::<T, HasVars>(linker, view)
}

impl spin3::spin::variables::variables::Host for VarsView<'_> {}

impl<T: Send> spin3::spin::variables::variables::HostWithStore<T> for HasVars {
    async fn get(
        accessor: &Accessor<T, Self>,
        name: String,
    ) -> wasmtime::Result<Result<String, spin3::spin::variables::variables::Error>> {
        use spin3::spin::variables::variables::Error;
        Ok(accessor.with(|mut access| match access.get().0.lookup(&name) {
            Ok(value) => Ok(value.to_owned()),
            Err(Missing::InvalidName(why)) => Err(Error::InvalidName(why)),
            Err(Missing::Undefined(name)) => Err(Error::Undefined(name)),
        }))
    }
}

impl spin2::fermyon::spin::variables::Host for VarsView<'_> {
    fn get(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<String, spin2::fermyon::spin::variables::Error>> {
        use spin2::fermyon::spin::variables::Error;
        Ok(match self.0.lookup(&name) {
            Ok(value) => Ok(value.to_owned()),
            Err(Missing::InvalidName(why)) => Err(Error::InvalidName(why)),
            Err(Missing::Undefined(name)) => Err(Error::Undefined(name)),
        })
    }
}

impl config::wasi::config::store::Host for VarsView<'_> {
    /// `none` for a name that is not set or not valid (what Spin answers: the draft has no
    /// error for either).
    fn get(
        &mut self,
        key: String,
    ) -> wasmtime::Result<Result<Option<String>, config::wasi::config::store::Error>> {
        Ok(Ok(self.0.lookup(&key).ok().map(str::to_owned)))
    }

    fn get_all(
        &mut self,
    ) -> wasmtime::Result<Result<Vec<(String, String)>, config::wasi::config::store::Error>> {
        Ok(Ok(self.0.values().iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_spins_rule() {
        for good in ["a", "abc", "a1b2c3", "a_1", "a_1_b_3", "api_key"] {
            check_name(good).expect(good);
        }
        for bad in ["", "aX", "1bc", "_x", "x.y", "x_", "a__b", "x-y", "é"] {
            assert!(check_name(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn values_never_show_in_debug() {
        let vars = Variables::new([("token".to_owned(), "s3cr3t".to_owned())].into()).expect("valid");
        let shown = format!("{vars:?}");
        assert!(shown.contains("token") && !shown.contains("s3cr3t"), "{shown}");
        assert!(Variables::new([("Token".to_owned(), "s3cr3t".to_owned())].into()).is_err());
    }

    #[test]
    fn lookup_tells_invalid_from_undefined() {
        let vars = Variables::new([("set".to_owned(), "v".to_owned())].into()).expect("valid");
        assert!(matches!(vars.lookup("set"), Ok("v")));
        assert!(matches!(vars.lookup("unset"), Err(Missing::Undefined(_))));
        assert!(matches!(vars.lookup("Bad"), Err(Missing::InvalidName(_))));
    }
}
