//! The thin tonic face of the gateway: reads the caller's deadline and
//! identity, hands the wire messages to [`Gateway`], maps errors once, and
//! returns `x-trace-id` / `x-request-id` in the metadata of every answer.

use std::sync::Arc;

use agentmesh_agent::grpc::deadline_of;
use agentmesh_proto::gateway as pb;
use agentmesh_proto::gateway::gateway_service_server::GatewayService;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::around::Rpc;
use crate::metadata::CallMeta;
use crate::service::Gateway;

/// `agentmesh.gateway.v1.GatewayService` over a [`Gateway`].
pub struct GatewayGrpc {
    gateway: Arc<Gateway>,
}

impl GatewayGrpc {
    /// The service over `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[tonic::async_trait]
impl GatewayService for GatewayGrpc {
    async fn execute_task(
        &self,
        request: Request<pb::ExecuteTaskRequest>,
    ) -> Result<Response<pb::ExecuteTaskResponse>, Status> {
        let deadline = deadline_of(&request);
        let call = CallMeta::of(&request);
        let response = self
            .gateway
            .execute(
                request.into_inner().task,
                "task",
                deadline,
                &call,
                Rpc::ExecuteTask,
            )
            .await
            .map_err(|error| call.fail(error.into()))?;
        Ok(call.respond(response))
    }

    type ExecuteTaskStreamStream = ReceiverStream<Result<pb::ExecuteTaskStreamResponse, Status>>;

    async fn execute_task_stream(
        &self,
        request: Request<pb::ExecuteTaskStreamRequest>,
    ) -> Result<Response<Self::ExecuteTaskStreamStream>, Status> {
        let deadline = deadline_of(&request);
        let call = CallMeta::of(&request);
        let receiver = self
            .gateway
            .execute_stream(request.into_inner().task, deadline, &call)
            .await
            .map_err(|error| call.fail(error.into()))?;
        Ok(call.respond(ReceiverStream::new(receiver)))
    }

    async fn execute_batch(
        &self,
        request: Request<pb::ExecuteBatchRequest>,
    ) -> Result<Response<pb::ExecuteBatchResponse>, Status> {
        let deadline = deadline_of(&request);
        let call = CallMeta::of(&request);
        let request = request.into_inner();
        let results = self
            .gateway
            .execute_batch(request.tasks, request.max_concurrency, deadline, &call)
            .await
            .map_err(|error| call.fail(error.into()))?;
        Ok(call.respond(pb::ExecuteBatchResponse { results }))
    }

    async fn run_workflow(
        &self,
        _request: Request<pb::RunWorkflowRequest>,
    ) -> Result<Response<pb::RunWorkflowResponse>, Status> {
        Err(Status::unimplemented(
            "workflows are not served by this gateway version yet",
        ))
    }

    async fn get_workflow_run(
        &self,
        _request: Request<pb::GetWorkflowRunRequest>,
    ) -> Result<Response<pb::GetWorkflowRunResponse>, Status> {
        Err(Status::unimplemented(
            "workflows are not served by this gateway version yet",
        ))
    }

    async fn get_circuit_states(
        &self,
        _request: Request<pb::GetCircuitStatesRequest>,
    ) -> Result<Response<pb::GetCircuitStatesResponse>, Status> {
        Ok(Response::new(self.gateway.circuit_states()))
    }
}
