//! The thin tonic face of the gateway: checks the caller's key against the
//! projects and calls it names (the key itself was checked by the auth
//! interceptor, see [`crate::auth`]), reads the caller's deadline, hands
//! the wire messages to [`Gateway`], maps errors once.

use std::sync::Arc;

use agentmesh_agent::grpc::deadline_of;
use agentmesh_proto::gateway as pb;
use agentmesh_proto::gateway::gateway_service_server::GatewayService;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::Principal;
use crate::service::Gateway;

/// PERMISSION_DENIED unless the key may use the task's project (an empty
/// project is left to the task's own validation, INVALID_ARGUMENT).
fn check_task_project(principal: &Principal, task: Option<&pb::TaskSpec>) -> Result<(), Status> {
    match task {
        Some(task) if !task.project_id.is_empty() => principal.require_project(&task.project_id),
        _ => Ok(()),
    }
}

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
        check_task_project(&Principal::of(&request)?, request.get_ref().task.as_ref())?;
        let deadline = deadline_of(&request);
        let response = self
            .gateway
            .execute(request.into_inner().task, "task", deadline)
            .await?;
        Ok(Response::new(response))
    }

    type ExecuteTaskStreamStream = ReceiverStream<Result<pb::ExecuteTaskStreamResponse, Status>>;

    async fn execute_task_stream(
        &self,
        request: Request<pb::ExecuteTaskStreamRequest>,
    ) -> Result<Response<Self::ExecuteTaskStreamStream>, Status> {
        check_task_project(&Principal::of(&request)?, request.get_ref().task.as_ref())?;
        let deadline = deadline_of(&request);
        let receiver = self
            .gateway
            .execute_stream(request.into_inner().task, deadline)
            .await?;
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn execute_batch(
        &self,
        request: Request<pb::ExecuteBatchRequest>,
    ) -> Result<Response<pb::ExecuteBatchResponse>, Status> {
        // A key may not even try a task outside its projects: the whole
        // batch is refused, naming the first such task.
        let principal = Principal::of(&request)?;
        for (index, task) in request.get_ref().tasks.iter().enumerate() {
            check_task_project(&principal, Some(task)).map_err(|status| {
                Status::permission_denied(format!("tasks[{index}]: {}", status.message()))
            })?;
        }
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let results = self
            .gateway
            .execute_batch(request.tasks, request.max_concurrency, deadline)
            .await?;
        Ok(Response::new(pb::ExecuteBatchResponse { results }))
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
        request: Request<pb::GetCircuitStatesRequest>,
    ) -> Result<Response<pb::GetCircuitStatesResponse>, Status> {
        Principal::of(&request)?.require_admin("GetCircuitStates")?;
        Ok(Response::new(self.gateway.circuit_states()))
    }
}
