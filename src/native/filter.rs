//! The per-request filter (feasibility stub: adds one header).

use std::sync::Arc;

use super::ffi::Stream;
use super::shared::Shared;

pub struct Filter {
    _shared: Arc<Shared>,
}

impl Filter {
    pub fn new(shared: Arc<Shared>, _stream: &Stream) -> Filter {
        Filter { _shared: shared }
    }
    pub fn on_request_headers(&mut self, stream: &Stream) -> bool {
        stream.set_request_header("x-phi-guard-native", Some("1"));
        true
    }
    pub fn on_scheduled(&mut self, _stream: &Stream, _event: u64) {}
    pub fn on_stream_complete(&mut self, _stream: &Stream) {}
}
