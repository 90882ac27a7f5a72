/**
 * Where each service listens: one address per service (the options, then
 * `AUTOECOOPS_<SERVICE>_ADDR`, then `AUTOECOOPS_<SERVICE>_PORT` on the host,
 * then the port table), or one resolver that answers for every service (an
 * ingress or proxy that routes by gRPC service).
 */
import type { DescService } from "@bufbuild/protobuf";

/** The mesh service serving each proto domain (`autoecoops.<domain>.v1`). */
export const DOMAIN_SERVICE: Readonly<Record<string, string>> = {
  auth: "auth-service",
  memory: "memory-hub",
  events: "event-bus",
  policy: "policy-audit",
  audit: "policy-audit",
  infra: "infra-manager",
  autoops: "autoops",
  iaops: "iaops",
  machineops: "machine-ops",
};

/** The port table. */
export const DEFAULT_PORTS: Readonly<Record<string, number>> = {
  "auth-service": 4001,
  "memory-hub": 4002,
  "event-bus": 4003,
  "policy-audit": 4004,
  "infra-manager": 4005,
  autoops: 5001,
  iaops: 5002,
  "machine-ops": 5003,
};

/** What a resolver is asked about. */
export interface ServiceTarget {
  /** The proto service, e.g. `autoecoops.auth.v1.AuthService`. */
  readonly typeName: string;
  /** The mesh service that serves it, e.g. `auth-service` ("" when unknown). */
  readonly meshService: string;
}

/** Answers `host:port` (or an http(s) URL) for a service. */
export type Resolver = (target: ServiceTarget) => string;

export interface RouteOptions {
  /**
   * Addresses by mesh service (`auth-service`) or proto service
   * (`autoecoops.auth.v1.AuthService`). An address may name several replicas:
   * a list (`["127.0.0.1:4001", "127.0.0.1:4011"]` or `"ip:port,ip:port"`)
   * or `dns:///name:port`; calls then go round robin to the healthy ones.
   */
  addresses?: Readonly<Record<string, string | readonly string[]>>;
  /** One resolver for every service; wins over `addresses` when it answers. */
  resolver?: Resolver;
  /** The host of the port table's defaults (default `AUTOECOOPS_HOST` or 127.0.0.1). */
  host?: string;
  /** Where `AUTOECOOPS_*` variables are read from (default `process.env`). */
  env?: Readonly<Record<string, string | undefined>>;
}

/** The mesh service of a proto service name. */
export function meshServiceOf(typeName: string): string {
  const domain = typeName.split(".")[1] ?? "";
  return DOMAIN_SERVICE[domain] ?? "";
}

/** Resolves each service's address per the options. */
export class Routes {
  constructor(private readonly options: RouteOptions = {}) {}

  /** `host:port` or a URL for `service`. */
  address(service: DescService | string): string {
    const typeName = typeof service === "string" ? service : service.typeName;
    const mesh = meshServiceOf(typeName);
    const o = this.options;
    const resolved = o.resolver?.({ typeName, meshService: mesh });
    if (resolved) return resolved;
    const given = o.addresses?.[typeName] ?? (mesh ? o.addresses?.[mesh] : undefined);
    if (given !== undefined && given.length > 0)
      return typeof given === "string" ? given : given.join(",");
    const env = o.env ?? process.env;
    const stem = mesh.toUpperCase().replace(/-/g, "_");
    if (stem) {
      const addr = env[`AUTOECOOPS_${stem}_ADDR`];
      if (addr) return addr;
    }
    const host = o.host ?? env["AUTOECOOPS_HOST"] ?? "127.0.0.1";
    const port = (stem && env[`AUTOECOOPS_${stem}_PORT`]) || DEFAULT_PORTS[mesh];
    if (port === undefined)
      throw new TypeError(
        `no address for ${typeName}: pass addresses["${typeName}"] or a resolver`,
      );
    return `${host.includes(":") ? `[${host}]` : host}:${port}`;
  }
}

/** The host part of `host:port`, `[v6]:port`, `dns:///host:port` or a URL. */
export function hostOf(target: string): string {
  let t = target.replace(/^dns:(\/\/[^/]*\/)?/, "");
  t = t.includes("://") ? t.split("://")[1]! : t;
  t = t.split("/")[0]!;
  if (t.startsWith("[")) return t.slice(1, t.indexOf("]"));
  const colon = t.lastIndexOf(":");
  return colon > 0 && t.indexOf(":") === colon ? t.slice(0, colon) : t;
}

/** True when `target` cannot leave this machine (every replica of a list is local). */
export function isLoopback(target: string): boolean {
  if (target.includes(",")) return target.replace(/^ipv[46]:/, "").split(",").every((t) => isLoopback(t.trim()));
  const host = hostOf(target).toLowerCase();
  return (
    host === "localhost" ||
    host.endsWith(".localhost") ||
    host === "::1" ||
    /^127\.\d+\.\d+\.\d+$/.test(host)
  );
}
