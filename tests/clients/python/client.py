"""agentmesh from Python: stubs generated from proto/ with grpcio-tools.

    python -m grpc_tools.protoc -I ../../../proto --python_out=generated \
        --grpc_python_out=generated $(find ../../../proto -name '*.proto')
    python client.py 127.0.0.1:50051

Calls ExecuteTask, streams ExecuteTaskStream and reads GetCircuitStates on
the gateway. Sends `authorization: Bearer $AGENTMESH_API_KEY` when that
variable is set. Exits non-zero on any failed call or unexpected answer.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "generated"))

import grpc  # noqa: E402
from agentmesh.common.v1 import common_pb2  # noqa: E402
from agentmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402


def metadata():
    key = os.environ.get("AGENTMESH_API_KEY")
    return (("authorization", f"Bearer {key}"),) if key else ()


def main(target):
    task = gateway_pb2.TaskSpec(
        agent_type="coder",
        project_id="polyglot",
        variables={"task": "write a haiku about gRPC from Python"},
    )
    with grpc.insecure_channel(target) as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)

        response, call = gateway.ExecuteTask.with_call(
            gateway_pb2.ExecuteTaskRequest(task=task), metadata=metadata(), timeout=30
        )
        assert response.task_id and response.output, response
        assert response.usage.total_tokens > 0, response
        headers = dict(call.initial_metadata())
        print(f"ExecuteTask: {response.task_id} on {response.node_id} "
              f"({response.usage.total_tokens} tokens, trace {response.trace_id}, "
              f"x-request-id {headers.get('x-request-id', '-')})")

        deltas, completions = [], 0
        stream = gateway.ExecuteTaskStream(
            gateway_pb2.ExecuteTaskStreamRequest(task=task), metadata=metadata(), timeout=30
        )
        for message in stream:
            kind = message.WhichOneof("event")
            if kind == "text_delta":
                deltas.append(message.text_delta)
            elif kind == "completion":
                completions += 1
        assert deltas and completions == 1, (len(deltas), completions)
        print(f"ExecuteTaskStream: {len(deltas)} deltas, then the completion: {''.join(deltas)[:60]!r}")

        states = gateway.GetCircuitStates(
            gateway_pb2.GetCircuitStatesRequest(), metadata=metadata(), timeout=10
        )
        assert states.nodes, states
        for node in states.nodes:
            state = common_pb2.CircuitState.Name(node.state)
            print(f"GetCircuitStates: {node.node_id} at {node.endpoint}: {state}")

        # A bad request is INVALID_ARGUMENT naming the field, never INTERNAL.
        try:
            gateway.ExecuteTask(gateway_pb2.ExecuteTaskRequest(), metadata=metadata(), timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
            print(f"ExecuteTask without a task: {error.code().name}: {error.details()}")
        else:
            raise AssertionError("ExecuteTask without a task succeeded")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")
    print("python client: ok")
