/** @autoecoops/sdk: one client for the whole AutoEcoOps mesh from Node.js. */
export {
  AutoEcoOps,
  type AutoEcoOpsOptions,
  type BiDiStreamingMethod,
  type CallInfo,
  type CallOptions,
  type ClientStreamingMethod,
  type MethodContract,
  type ResponseStream,
  type ServerStreamingMethod,
  type ServiceClients,
  type SubClient,
  type TlsOptions,
  type UnaryMethod,
  contractOf,
} from "./client.js";
export * from "./credentials.js";
export * from "./errors.js";
export * from "./retry.js";
export { ReplicaTransport, type ReplicaOptions, isReplicaSet, replicaList } from "./replicas.js";
export { DEFAULT_PORTS, DOMAIN_SERVICE, type Resolver, type RouteOptions, type ServiceTarget, Routes } from "./routes.js";
export { type TracingOptions, INSTRUMENTATION } from "./tracing.js";
export { services, type Services } from "./gen/services.js";
export { Consumer, type ConsumerOptions, type Event, PermanentError } from "./consumer.js";
