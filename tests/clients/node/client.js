// agentmesh from Node.js: @grpc/grpc-js with the service definitions loaded
// from proto/ by @grpc/proto-loader.
//
//   npm install && node client.js 127.0.0.1:50051
//
// Calls ExecuteTask, streams ExecuteTaskStream and reads GetCircuitStates on
// the gateway. Sends `authorization: Bearer $AGENTMESH_API_KEY` when that
// variable is set. Exits non-zero on any failed call or unexpected answer.
'use strict';

const path = require('node:path');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '../../../proto');

function loadGateway() {
  const definition = protoLoader.loadSync('agentmesh/gateway/v1/gateway.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: false,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).agentmesh.gateway.v1;
}

function metadata() {
  const md = new grpc.Metadata();
  if (process.env.AGENTMESH_API_KEY) {
    md.set('authorization', `Bearer ${process.env.AGENTMESH_API_KEY}`);
  }
  return md;
}

function deadline(seconds) {
  return { deadline: new Date(Date.now() + seconds * 1000) };
}

function unary(client, method, request, seconds) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata(), deadline(seconds), (error, response) =>
      error ? reject(error) : resolve(response));
  });
}

function collect(stream) {
  return new Promise((resolve, reject) => {
    const messages = [];
    stream.on('data', (message) => messages.push(message));
    stream.on('error', reject);
    stream.on('end', () => resolve(messages));
  });
}

async function main(target) {
  const gateway = loadGateway();
  const client = new gateway.GatewayService(target, grpc.credentials.createInsecure());
  const task = {
    agentType: 'coder',
    projectId: 'polyglot',
    variables: { task: 'write a haiku about gRPC from Node.js' },
  };
  try {
    const response = await unary(client, 'ExecuteTask', { task }, 30);
    assert.ok(response.taskId && response.output, JSON.stringify(response));
    assert.ok(Number(response.usage.totalTokens) > 0, JSON.stringify(response.usage));
    console.log(`ExecuteTask: ${response.taskId} on ${response.nodeId} ` +
      `(${response.usage.totalTokens} tokens, trace ${response.traceId})`);

    const messages = await collect(
      client.ExecuteTaskStream({ task }, metadata(), deadline(30)));
    const deltas = messages.filter((m) => m.event === 'textDelta').map((m) => m.textDelta);
    const completions = messages.filter((m) => m.event === 'completion');
    assert.ok(deltas.length > 0, 'no text deltas');
    assert.equal(completions.length, 1, 'one completion');
    console.log(`ExecuteTaskStream: ${deltas.length} deltas, then the completion: ` +
      JSON.stringify(deltas.join('').slice(0, 60)));

    const states = await unary(client, 'GetCircuitStates', {}, 10);
    assert.ok(states.nodes.length > 0, 'no nodes');
    for (const node of states.nodes) {
      console.log(`GetCircuitStates: ${node.nodeId} at ${node.endpoint}: ${node.state}`);
    }

    // A bad request is INVALID_ARGUMENT naming the field, never INTERNAL.
    await assert.rejects(unary(client, 'ExecuteTask', {}, 10), (error) => {
      assert.equal(error.code, grpc.status.INVALID_ARGUMENT, error.message);
      console.log(`ExecuteTask without a task: INVALID_ARGUMENT: ${error.details}`);
      return true;
    });
  } finally {
    client.close();
  }
}

main(process.argv[2] || '127.0.0.1:50051').then(
  () => console.log('node client: ok'),
  (error) => {
    console.error(`node client: ${error.stack || error}`);
    process.exit(1);
  });
