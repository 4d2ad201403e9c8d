//! nv's test bed, shared by the integration tests and `cargo xtask demo`: hosts are network
//! namespaces joined by an underlay bridge, VMs are namespaces behind veth ports, each host runs
//! its own agent. Everything is created with a unique prefix and removed by RAII guards, even
//! when a test fails.
pub mod bench;
pub mod capture;
pub mod checks;
pub mod etcd;
pub mod fixture;
pub mod fuzz;
pub mod guest;
pub mod netns;
pub mod prometheus;
pub mod sys;
pub mod testbed;
