//! The thin tonic face of the gateway: checks the caller's key against the
//! projects and calls it names (the key itself was checked by the auth
//! interceptor, see [`crate::auth`]), reads the caller's deadline and
//! identity, refuses work for stopped projects, hands the wire messages to
//! [`Gateway`] or [`Workflows`], maps errors once,
//! and returns `x-trace-id` / `x-request-id` in the metadata of every answer.

use std::sync::Arc;

use agentmesh_agent::grpc::deadline_of;
use agentmesh_proto::gateway as pb;
use agentmesh_proto::gateway::gateway_service_server::GatewayService;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::around::Rpc;
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::metadata::CallMeta;
use crate::service::Gateway;
use crate::workflow::Workflows;

/// `agentmesh.gateway.v1.GatewayService` over a [`Gateway`] and its
/// [`Workflows`].
pub struct GatewayGrpc {
    gateway: Arc<Gateway>,
    workflows: Arc<Workflows>,
}

impl GatewayGrpc {
    /// The service over `gateway` and `workflows`.
    pub fn new(gateway: Arc<Gateway>, workflows: Arc<Workflows>) -> Self {
        Self { gateway, workflows }
    }

    /// Refuses a task whose project is under an emergency stop.
    fn check_task(&self, task: Option<&pb::TaskSpec>) -> Result<(), Status> {
        match task {
            Some(task) => self
                .workflows
                .check_project(&task.project_id)
                .map_err(|error| Status::from(GatewayError::from(error))),
            None => Ok(()),
        }
    }
}

/// Who is calling: recorded with approvals, rejections, cancels and stops.
/// The API key's id (`key:<id>`); while authentication is off, the peer
/// address.
pub fn caller_identity<T>(request: &Request<T>) -> String {
    let peer = request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |address| address.to_string());
    match request.extensions().get::<Principal>() {
        Some(principal) if principal.key_id() != crate::auth::ANONYMOUS_KEY_ID => {
            format!("key:{}", principal.key_id())
        }
        _ => peer,
    }
}

/// PERMISSION_DENIED unless the key may use the task's project (an empty
/// project is left to the task's own validation, INVALID_ARGUMENT).
fn check_task_project(principal: &Principal, task: Option<&pb::TaskSpec>) -> Result<(), Status> {
    match task {
        Some(task) if !task.project_id.is_empty() => principal.require_project(&task.project_id),
        _ => Ok(()),
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
        let call = CallMeta::of(&request);
        self.check_task(request.get_ref().task.as_ref())
            .map_err(|status| call.fail(status))?;
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
        check_task_project(&Principal::of(&request)?, request.get_ref().task.as_ref())?;
        let deadline = deadline_of(&request);
        let call = CallMeta::of(&request);
        self.check_task(request.get_ref().task.as_ref())
            .map_err(|status| call.fail(status))?;
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
        // A key may not even try a task outside its projects: the whole
        // batch is refused, naming the first such task.
        let principal = Principal::of(&request)?;
        for (index, task) in request.get_ref().tasks.iter().enumerate() {
            check_task_project(&principal, Some(task)).map_err(|status| {
                Status::permission_denied(format!("tasks[{index}]: {}", status.message()))
            })?;
        }
        let deadline = deadline_of(&request);
        let call = CallMeta::of(&request);
        let request = request.into_inner();
        for task in &request.tasks {
            self.check_task(Some(task))?;
        }
        let results = self
            .gateway
            .execute_batch(request.tasks, request.max_concurrency, deadline, &call)
            .await
            .map_err(|error| call.fail(error.into()))?;
        Ok(call.respond(pb::ExecuteBatchResponse { results }))
    }

    async fn run_workflow(
        &self,
        request: Request<pb::RunWorkflowRequest>,
    ) -> Result<Response<pb::RunWorkflowResponse>, Status> {
        Principal::of(&request)?.require_project(&request.get_ref().project_id)?;
        let deadline = deadline_of(&request);
        let actor = caller_identity(&request);
        let run = self
            .workflows
            .run(request.into_inner(), &actor, deadline)
            .await
            .map_err(workflow_status)?;
        Ok(Response::new(pb::RunWorkflowResponse { run: Some(run) }))
    }

    async fn get_workflow_run(
        &self,
        request: Request<pb::GetWorkflowRunRequest>,
    ) -> Result<Response<pb::GetWorkflowRunResponse>, Status> {
        let run = self
            .workflows
            .get(&request.get_ref().run_id)
            .await
            .map_err(workflow_status)?;
        Ok(Response::new(pb::GetWorkflowRunResponse { run: Some(run) }))
    }

    type WatchWorkflowRunStream = ReceiverStream<Result<pb::WatchWorkflowRunResponse, Status>>;

    async fn watch_workflow_run(
        &self,
        request: Request<pb::WatchWorkflowRunRequest>,
    ) -> Result<Response<Self::WatchWorkflowRunStream>, Status> {
        let receiver = self
            .workflows
            .watch(&request.get_ref().run_id, request.get_ref().after_sequence)
            .await
            .map_err(workflow_status)?;
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn approve_step(
        &self,
        request: Request<pb::ApproveStepRequest>,
    ) -> Result<Response<pb::ApproveStepResponse>, Status> {
        let actor = caller_identity(&request);
        let request = request.into_inner();
        let run = self
            .workflows
            .approve(&request.run_id, &request.step, &request.comment, &actor)
            .await
            .map_err(workflow_status)?;
        Ok(Response::new(pb::ApproveStepResponse { run: Some(run) }))
    }

    async fn reject_step(
        &self,
        request: Request<pb::RejectStepRequest>,
    ) -> Result<Response<pb::RejectStepResponse>, Status> {
        let actor = caller_identity(&request);
        let request = request.into_inner();
        let run = self
            .workflows
            .reject(
                &request.run_id,
                &request.step,
                &request.reason,
                &request.amendment,
                &actor,
            )
            .await
            .map_err(workflow_status)?;
        Ok(Response::new(pb::RejectStepResponse { run: Some(run) }))
    }

    async fn cancel_workflow_run(
        &self,
        request: Request<pb::CancelWorkflowRunRequest>,
    ) -> Result<Response<pb::CancelWorkflowRunResponse>, Status> {
        let actor = caller_identity(&request);
        let request = request.into_inner();
        let run = self
            .workflows
            .cancel(&request.run_id, &request.reason, &actor)
            .await
            .map_err(workflow_status)?;
        Ok(Response::new(pb::CancelWorkflowRunResponse {
            run: Some(run),
        }))
    }

    async fn list_workflow_definitions(
        &self,
        _request: Request<pb::ListWorkflowDefinitionsRequest>,
    ) -> Result<Response<pb::ListWorkflowDefinitionsResponse>, Status> {
        Ok(Response::new(self.workflows.definitions()))
    }

    async fn stop_project(
        &self,
        request: Request<pb::StopProjectRequest>,
    ) -> Result<Response<pb::StopProjectResponse>, Status> {
        Principal::of(&request)?.require_project(&request.get_ref().project_id)?;
        let actor = caller_identity(&request);
        let request = request.into_inner();
        let response = self
            .workflows
            .stop_project(
                &request.project_id,
                &request.reason,
                request.cancel_runs,
                &actor,
            )
            .await
            .map_err(workflow_status)?;
        Ok(Response::new(response))
    }

    async fn resume_project(
        &self,
        request: Request<pb::ResumeProjectRequest>,
    ) -> Result<Response<pb::ResumeProjectResponse>, Status> {
        Principal::of(&request)?.require_project(&request.get_ref().project_id)?;
        let actor = caller_identity(&request);
        let response = self
            .workflows
            .resume_project(&request.get_ref().project_id, &actor)
            .await
            .map_err(workflow_status)?;
        Ok(Response::new(response))
    }

    async fn get_circuit_states(
        &self,
        request: Request<pb::GetCircuitStatesRequest>,
    ) -> Result<Response<pb::GetCircuitStatesResponse>, Status> {
        Principal::of(&request)?.require_admin("GetCircuitStates")?;
        Ok(Response::new(self.gateway.circuit_states()))
    }
}

fn workflow_status(error: crate::error::WorkflowError) -> Status {
    Status::from(GatewayError::from(error))
}
