//! The filter configuration (feasibility stub).

use std::sync::Arc;

use super::ffi::Config;

pub struct Shared {}

impl Shared {
    pub fn new(_config: Config, _name: &[u8], _doc: &[u8]) -> Result<Arc<Shared>, String> {
        Ok(Arc::new(Shared {}))
    }
    pub fn stop(&self) {}
    pub fn on_main_tick(&self, _config: Config) {}
    pub fn on_callout_done(
        &self,
        _config: Config,
        _id: u64,
        _ok: bool,
        _status: Option<Vec<u8>>,
        _body: Vec<u8>,
    ) {
    }
}
