/**
 * Who the client is: a static token, client credentials (IssueToken) or a
 * token exchange (ExchangeToken, RFC 8693, optionally with an actor), and the
 * cache that keeps the token fresh.
 *
 * A `TokenSource` holds the current token and replaces it `refreshMarginMs`
 * before it expires (never in the first half of its life), with one request
 * in flight however many calls wait for it (single flight).
 */
import type {
  ExchangeTokenRequest,
  ExchangeTokenResponse,
  IssueTokenRequest,
  IssueTokenResponse,
} from "./gen/autoecoops/auth/v1/auth_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type {
  ExchangeTokenRequestSchema,
  IssueTokenRequestSchema,
} from "./gen/autoecoops/auth/v1/auth_pb.js";

/** RFC 8693 token type of a JWT. */
export const JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt";
/** Assumed lifetime of a token that states none, so it is still refreshed. */
const UNKNOWN_LIFETIME_MS = 300_000;

/** A token obtained elsewhere, sent as is (never refreshed). */
export interface StaticToken {
  readonly kind: "static";
  readonly token: string;
}

/** A service account's id and secret, exchanged for tokens with IssueToken. */
export interface ClientCredentials {
  readonly kind: "client_credentials";
  readonly clientId: string;
  readonly clientSecret: string;
  /** The audience to ask for; empty is the mesh. */
  readonly audience?: string;
  /** Scopes to ask for, a subset of what the account holds. */
  readonly scopes?: readonly string[];
  /** Replace the token this long before it expires (default 60 s). */
  readonly refreshMarginMs?: number;
}

/**
 * A token exchanged for one of ours with ExchangeToken. With an `actor`, the
 * new token records that party as acting for the subject (the `act` claim).
 */
export interface TokenExchange {
  readonly kind: "token_exchange";
  /** The token to exchange, or a function returning the current one. */
  readonly subjectToken: string | (() => string | Promise<string>);
  readonly subjectTokenType?: string;
  /** The audience of the new token (default `autoecoops`). */
  readonly audience?: string;
  /** Who acts on the subject's behalf: its own credentials. */
  readonly actor?: Credentials;
  readonly scopes?: readonly string[];
  readonly refreshMarginMs?: number;
}

export type Credentials = StaticToken | ClientCredentials | TokenExchange;

/** A token obtained elsewhere, sent as is. */
export function staticToken(token: string): StaticToken {
  if (!token.trim()) throw new TypeError("staticToken needs a non-empty token");
  return { kind: "static", token };
}

/** Client credentials (OAuth 2.0) against auth-service's IssueToken. */
export function clientCredentials(
  clientId: string,
  clientSecret: string,
  options: Omit<ClientCredentials, "kind" | "clientId" | "clientSecret"> = {},
): ClientCredentials {
  if (!clientId || !clientSecret)
    throw new TypeError("clientCredentials needs a client id and a secret");
  return { kind: "client_credentials", clientId, clientSecret, ...options };
}

/** Token exchange (RFC 8693) against auth-service's ExchangeToken; `actor` for on-behalf-of. */
export function tokenExchange(
  subjectToken: TokenExchange["subjectToken"],
  options: Omit<TokenExchange, "kind" | "subjectToken"> = {},
): TokenExchange {
  return { kind: "token_exchange", subjectToken, ...options };
}

/** How a token source reaches auth-service (the client's own public RPCs). */
export interface TokenEndpoint {
  issueToken(req: MessageInitShape<typeof IssueTokenRequestSchema>): Promise<IssueTokenResponse>;
  exchangeToken(
    req: MessageInitShape<typeof ExchangeTokenRequestSchema>,
  ): Promise<ExchangeTokenResponse>;
}

/** When a JWT expires by its own `exp` claim (ms since the epoch), if it says. */
export function jwtExpiry(token: string): number | undefined {
  const payload = token.split(".")[1];
  if (payload === undefined) return undefined;
  try {
    const claims: unknown = JSON.parse(Buffer.from(payload, "base64url").toString("utf8"));
    const exp = (claims as { exp?: unknown }).exp;
    return typeof exp === "number" ? exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

function expiryOf(
  reply: IssueTokenResponse | ExchangeTokenResponse,
  now: number,
): number {
  const t = reply.expireTime;
  if (t !== undefined) return Number(t.seconds) * 1000 + t.nanos / 1e6;
  return jwtExpiry(reply.accessToken) ?? now + UNKNOWN_LIFETIME_MS;
}

/** A credential's current token: cached, refreshed before expiry, single flight. */
export class TokenSource {
  private token = "";
  private refreshAt = 0;
  private inflight: Promise<string> | undefined;
  private readonly actor: TokenSource | undefined;
  /** Token requests sent (IssueToken/ExchangeToken), for metrics and tests. */
  fetches = 0;

  constructor(
    readonly credentials: Credentials,
    private readonly endpoint: TokenEndpoint,
    /** Wall-clock ms (token expiry is wall time). */
    private readonly wallClock: () => number = Date.now,
  ) {
    this.actor =
      credentials.kind === "token_exchange" && credentials.actor !== undefined
        ? new TokenSource(credentials.actor, endpoint, wallClock)
        : undefined;
  }

  /** A token valid for at least the refresh margin. */
  get(): Promise<string> | string {
    if (this.credentials.kind === "static") return this.credentials.token;
    if (this.token && this.wallClock() < this.refreshAt) return this.token;
    // Every caller arriving while a refresh runs waits for that one.
    this.inflight ??= this.refresh().finally(() => {
      this.inflight = undefined;
    });
    return this.inflight;
  }

  /** Forget `token` after a server rejected it; false if it cannot be replaced. */
  invalidate(token: string): boolean {
    if (this.credentials.kind === "static") return false;
    if (this.token === token) this.refreshAt = 0;
    return true;
  }

  private async refresh(): Promise<string> {
    const creds = this.credentials;
    const fetchedAt = this.wallClock();
    let reply: IssueTokenResponse | ExchangeTokenResponse;
    this.fetches += 1;
    if (creds.kind === "client_credentials") {
      reply = await this.endpoint.issueToken({
        clientId: creds.clientId,
        clientSecret: creds.clientSecret,
        audience: creds.audience ?? "",
        scopes: [...(creds.scopes ?? [])],
      });
    } else if (creds.kind === "token_exchange") {
      const subject =
        typeof creds.subjectToken === "function" ? await creds.subjectToken() : creds.subjectToken;
      const actor = this.actor === undefined ? "" : await this.actor.get();
      reply = await this.endpoint.exchangeToken({
        subjectToken: subject,
        subjectTokenType: creds.subjectTokenType ?? JWT_TOKEN_TYPE,
        actorToken: actor,
        actorTokenType: actor ? JWT_TOKEN_TYPE : "",
        audience: creds.audience ?? "autoecoops",
        scopes: [...(creds.scopes ?? [])],
      });
    } else {
      return creds.token;
    }
    const expires = expiryOf(reply, fetchedAt);
    const margin = creds.refreshMarginMs ?? 60_000;
    const lifetime = Math.max(0, expires - fetchedAt);
    // Never refresh in the first half of a token's life: a short-lived token
    // (or a skewed clock) must not make every call fetch a new one.
    this.refreshAt = expires - Math.min(margin, lifetime / 2);
    this.token = reply.accessToken;
    return this.token;
  }
}
