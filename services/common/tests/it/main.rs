//! Smoke tests of the local dependencies through the clients the services use (real
//! PostgreSQL, Redis and Kafka from `just deps-up`; nothing is mocked).

mod http;
mod kafka;
mod outbox;
mod postgres;
mod redis;
