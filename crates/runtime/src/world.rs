//! Which `wasi:http` world a component serves, read from its exports before it is compiled (the
//! two worlds run on differently configured engines).

/// The `wasi:http` world a handler exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    /// `wasi:http/incoming-handler@0.2.x` (WASI 0.2: wstd, spin-sdk 2–5, componentize-py ...).
    Http02,
    /// `wasi:http/handler@0.3.x` (WASI 0.3: spin-sdk 6 and 7, wasmtime serve's p3 ...).
    Http03,
}

impl World {
    /// The world `wasm` (a component) serves: WASI 0.3 if its top level exports
    /// `wasi:http/handler@0.3.*`, else WASI 0.2 (whose pre-instantiation says precisely what a
    /// component exporting neither lacks).
    pub(crate) fn of(wasm: &[u8]) -> World {
        use wasmparser::Payload;
        // Nested modules and components have export sections of their own: only depth 0 counts.
        let mut depth = 0usize;
        for payload in wasmparser::Parser::new(0).parse_all(wasm) {
            match payload {
                Ok(Payload::ModuleSection { .. } | Payload::ComponentSection { .. }) => depth += 1,
                Ok(Payload::End(_)) => depth = depth.saturating_sub(1),
                Ok(Payload::ComponentExportSection(exports)) if depth == 0 => {
                    for export in exports.into_iter().flatten() {
                        if export.name.0.starts_with("wasi:http/handler@0.3.") {
                            return World::Http03;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        World::Http02
    }

    /// How `atoll apps` and the API name it.
    pub fn as_str(self) -> &'static str {
        match self {
            World::Http02 => "wasi:http@0.2",
            World::Http03 => "wasi:http@0.3",
        }
    }
}

impl std::fmt::Display for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
