package kiln.oip;

import com.google.gson.JsonParser;
import io.grpc.Context;
import io.grpc.Contexts;
import io.grpc.ForwardingServerCall;
import io.grpc.Metadata;
import io.grpc.ServerCall;
import io.grpc.ServerCallHandler;
import io.grpc.ServerInterceptor;
import io.grpc.Status;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import org.pytorch.serve.grpc.inference.PredictionResponse;
import org.pytorch.serve.util.TokenAuthorization;

/**
 * One gRPC call as Kiln sees it: the routing key it came with, and what its answer says
 * beyond TorchServe's (which version gave it, which shadows sampled it). A service sets them
 * while it handles the call (GrpcCall.current()); Marks writes them into the answer's
 * metadata: its headers, or its trailers when the call ends without headers (an error).
 */
final class GrpcCall {

    // As the REST and OIP headers (OipRoutes.VERSION_HEADER, SHADOWED_HEADER, Router.KEY_HEADER).
    static final Metadata.Key<String> VERSION = key(OipRoutes.VERSION_HEADER);
    static final Metadata.Key<String> SHADOWED = key(OipRoutes.SHADOWED_HEADER);
    static final Metadata.Key<String> ROUTING_KEY = key(Router.KEY_HEADER);
    private static final Metadata.Key<String> AUTHORIZATION = key("authorization");
    private static final Context.Key<GrpcCall> CURRENT = Context.key("kiln-grpc-call");
    // The start of a Kiln handler's error answer ({"error": ..., "code": ...}), which
    // TorchServe's gRPC sends as an OK answer like any other.
    private static final byte[] ERROR_START = "{\"error\"".getBytes(StandardCharsets.UTF_8);

    final String routingKey;
    // What goes on to the worker (Traced.TO_WORKER), from the front proxy's metadata.
    final Map<String, String> traced;
    private volatile String version;
    private volatile String shadowed;
    private volatile CompletableFuture<Reply> answer;

    private GrpcCall(String routingKey, Map<String, String> traced) {
        this.routingKey = routingKey;
        this.traced = traced;
    }

    /** The call being handled on this thread (set by Marks). */
    static GrpcCall current() {
        return CURRENT.get();
    }

    void answeredBy(String version) {
        this.version = version;
    }

    void sampledFor(String versions) {
        this.shadowed = versions;
    }

    /** The call's answer as a Reply once it is sent: what a shadow is compared with. */
    CompletableFuture<Reply> answer() {
        CompletableFuture<Reply> out = new CompletableFuture<>();
        answer = out;
        return out;
    }

    private void mark(Metadata metadata) {
        if (version != null) {
            metadata.put(VERSION, version);
        }
        if (shadowed != null) {
            metadata.put(SHADOWED, shadowed);
        }
    }

    private void sent(Object message) {
        CompletableFuture<Reply> out = answer;
        if (out != null && message instanceof PredictionResponse) {
            byte[] body = ((PredictionResponse) message).getPrediction().toByteArray();
            out.complete(new Reply(status(body), Reply.JSON, body));
        }
    }

    private void closed(Status status) {
        CompletableFuture<Reply> out = answer;
        if (out != null) {  // ended without an answer (no worker, cancelled...)
            out.complete(Reply.error(500, "gRPC " + status.getCode()));
        }
    }

    /** The HTTP status of a handler's answer: its error's code, or 200. */
    private static int status(byte[] body) {
        if (body.length < ERROR_START.length) {
            return 200;
        }
        for (int i = 0; i < ERROR_START.length; i++) {
            if (body[i] != ERROR_START[i]) {
                return 200;
            }
        }
        try {  // an error answer: rare, and small
            return JsonParser.parseString(new String(body, StandardCharsets.UTF_8))
                    .getAsJsonObject().get("code").getAsInt();
        } catch (RuntimeException e) {
            return 200;
        }
    }

    private static Map<String, String> traced(Metadata headers) {
        Map<String, String> found = new LinkedHashMap<>();
        for (String name : Traced.TO_WORKER) {
            String value = headers.get(key(name));
            if (value != null) {
                found.put(name, value);
            }
        }
        return found;
    }

    private static Metadata.Key<String> key(String name) {
        return Metadata.Key.of(name, Metadata.ASCII_STRING_MARSHALLER);
    }

    /** Makes each call a GrpcCall, and writes what it says into the answer's metadata. */
    static final class Marks implements ServerInterceptor {
        @Override
        public <Q, A> ServerCall.Listener<Q> interceptCall(ServerCall<Q, A> call, Metadata headers,
                ServerCallHandler<Q, A> next) {
            GrpcCall state = new GrpcCall(headers.get(ROUTING_KEY), traced(headers));
            ServerCall<Q, A> marked = new ForwardingServerCall.SimpleForwardingServerCall<>(call) {
                // gRPC calls a ServerCall's methods one at a time, never concurrently.
                private volatile boolean headersSent;

                @Override
                public void sendHeaders(Metadata out) {
                    state.mark(out);
                    headersSent = true;
                    super.sendHeaders(out);
                }

                @Override
                public void sendMessage(A message) {
                    super.sendMessage(message);
                    state.sent(message);
                }

                @Override
                public void close(Status status, Metadata trailers) {
                    if (!headersSent) {  // trailers-only: the metadata goes there
                        state.mark(trailers);
                    }
                    super.close(status, trailers);
                    state.closed(status);
                }
            };
            return Contexts.interceptCall(Context.current().withValue(CURRENT, state), marked,
                    headers, next);
        }
    }

    /**
     * The token TorchServe's own inference API demands (its GRPCInterceptor's check), while
     * token authorization is on: the front proxy sends it, anyone else on the host has none.
     */
    static final class TokenCheck implements ServerInterceptor {
        @Override
        public <Q, A> ServerCall.Listener<Q> interceptCall(ServerCall<Q, A> call, Metadata headers,
                ServerCallHandler<Q, A> next) {
            if (TokenAuthorization.isEnabled() && !authorized(headers.get(AUTHORIZATION))) {
                call.close(Status.UNAUTHENTICATED.withDescription(
                        "no valid inference token (authorization: Bearer TOKEN)"), new Metadata());
                return new ServerCall.Listener<>() {};
            }
            return next.startCall(call, headers);
        }

        private static boolean authorized(String header) {
            String[] parts = header == null ? new String[0] : header.split(" ", 2);
            return parts.length == 2 && TokenAuthorization.checkTokenAuthorization(parts[1],
                    TokenAuthorization.TokenType.INFERENCE);
        }
    }
}
