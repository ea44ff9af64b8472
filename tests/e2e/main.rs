//! End-to-end tests: the real llmproxy binary between a mock vLLM and a webhook
//! receiver, all on loopback with ports picked at run time. One test crate with
//! modules, so one binary links.

mod amqp;
mod cli;
mod cluster;
mod delivery;
mod errors;
mod harness;
mod hostile;
mod limits;
mod llamacpp;
mod metering;
mod routes;
mod routing;
mod sdk;
mod tls;
