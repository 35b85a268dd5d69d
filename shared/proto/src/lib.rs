//! Generated protobuf and gRPC code for every agentmesh contract, plus the
//! encoded descriptor set that server reflection serves.
//!
//! Each service has a short alias module (`agentmesh_proto::config`, …) with
//! its messages, client and server, and its fully qualified service name.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The packages exactly as declared in `proto/`, so generated cross-package
/// paths resolve.
pub mod agentmesh {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("agentmesh.common.v1");
        }
    }
    pub mod config {
        pub mod v1 {
            tonic::include_proto!("agentmesh.config.v1");
        }
    }
    pub mod cache {
        pub mod v1 {
            tonic::include_proto!("agentmesh.cache.v1");
        }
    }
    pub mod audit {
        pub mod v1 {
            tonic::include_proto!("agentmesh.audit.v1");
        }
    }
    pub mod agent {
        pub mod v1 {
            tonic::include_proto!("agentmesh.agent.v1");
        }
    }
    pub mod gateway {
        pub mod v1 {
            tonic::include_proto!("agentmesh.gateway.v1");
        }
    }
}

/// The encoded `FileDescriptorSet` of every agentmesh proto file (and the
/// well-known types they import), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/agentmesh_descriptor.bin"));

/// Shared types.
pub mod common {
    pub use crate::agentmesh::common::v1::*;
}

/// The config service contract.
pub mod config {
    pub use crate::agentmesh::config::v1::*;
    /// Fully qualified gRPC service name.
    pub const SERVICE_NAME: &str = "agentmesh.config.v1.ConfigService";
}

/// The cache service contract.
pub mod cache {
    pub use crate::agentmesh::cache::v1::*;
    /// Fully qualified gRPC service name.
    pub const SERVICE_NAME: &str = "agentmesh.cache.v1.CacheService";
}

/// The audit service contract.
pub mod audit {
    pub use crate::agentmesh::audit::v1::*;
    /// Fully qualified gRPC service name.
    pub const SERVICE_NAME: &str = "agentmesh.audit.v1.AuditService";
}

/// The agent service contract.
pub mod agent {
    pub use crate::agentmesh::agent::v1::*;
    /// Fully qualified gRPC service name.
    pub const SERVICE_NAME: &str = "agentmesh.agent.v1.AgentService";
}

/// The gateway service contract.
pub mod gateway {
    pub use crate::agentmesh::gateway::v1::*;
    /// Fully qualified gRPC service name.
    pub const SERVICE_NAME: &str = "agentmesh.gateway.v1.GatewayService";
    /// Fully qualified gRPC name of the key management service.
    pub const KEY_SERVICE_NAME: &str = "agentmesh.gateway.v1.KeyService";
}
