package kiln.oip;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import com.google.protobuf.Message;
import io.grpc.BindableService;
import io.grpc.MethodDescriptor;
import io.grpc.ServerServiceDefinition;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.ProtoUtils;
import io.grpc.stub.ServerCalls;
import io.grpc.stub.StreamObserver;
import java.nio.charset.StandardCharsets;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.function.Function;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelInferResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelMetadataRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelMetadataResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelMetadataResponse.TensorMetadata;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelReadyRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ModelReadyResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerLiveRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerLiveResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerMetadataRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerMetadataResponse;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerReadyRequest;
import org.pytorch.serve.grpc.openinference.OpenInferenceGrpc.ServerReadyResponse;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The Open Inference Protocol over gRPC: KServe's inference.GRPCInferenceService
 * (deploy/oip_plugin/proto/grpc_predict_v2.proto), on a port of its own. Each call is the
 * matching OIP HTTP request handed to OipRoutes, and its answer translated back (GrpcTensors for
 * infer), so that both protocols answer alike: readiness, metadata, routes and shadows, limits,
 * the handler's per-request errors in the same words. An HTTP error status becomes the gRPC
 * status of its class (status()), its message the status' description.
 *
 * TorchServe's jar carries the messages, compiled from the same specification under its own
 * package; the service is declared here under KServe's name, which is what clients call.
 */
final class GrpcOip implements BindableService {

    /** host:port, set with -Dkiln.oip_grpc.address=... in config.properties' vmargs. */
    static final String ADDRESS_PROPERTY = "kiln.oip_grpc.address";
    static final String SERVICE = "inference.GRPCInferenceService";
    private static final Logger LOG = LoggerFactory.getLogger(GrpcOip.class);

    private final OipRoutes routes;

    GrpcOip(Router router, Shadow shadow) {
        this.routes = new OipRoutes(RequestLimits.fromProperties(), router, shadow);
    }

    @Override
    public ServerServiceDefinition bindService() {
        return ServerServiceDefinition.builder(SERVICE)
                .addMethod(method("ServerLive", ServerLiveRequest.getDefaultInstance(),
                        ServerLiveResponse.getDefaultInstance()),
                        ServerCalls.asyncUnaryCall(this::serverLive))
                .addMethod(method("ServerReady", ServerReadyRequest.getDefaultInstance(),
                        ServerReadyResponse.getDefaultInstance()),
                        ServerCalls.asyncUnaryCall(this::serverReady))
                .addMethod(method("ModelReady", ModelReadyRequest.getDefaultInstance(),
                        ModelReadyResponse.getDefaultInstance()),
                        ServerCalls.asyncUnaryCall(this::modelReady))
                .addMethod(method("ServerMetadata", ServerMetadataRequest.getDefaultInstance(),
                        ServerMetadataResponse.getDefaultInstance()),
                        ServerCalls.asyncUnaryCall(this::serverMetadata))
                .addMethod(method("ModelMetadata", ModelMetadataRequest.getDefaultInstance(),
                        ModelMetadataResponse.getDefaultInstance()),
                        ServerCalls.asyncUnaryCall(this::modelMetadata))
                .addMethod(method("ModelInfer", ModelInferRequest.getDefaultInstance(),
                        ModelInferResponse.getDefaultInstance()),
                        ServerCalls.asyncUnaryCall(this::modelInfer))
                .build();
    }

    private static <Q extends Message, A extends Message> MethodDescriptor<Q, A> method(
            String name, Q request, A answer) {
        return MethodDescriptor.<Q, A>newBuilder()
                .setType(MethodDescriptor.MethodType.UNARY)
                .setFullMethodName(MethodDescriptor.generateFullMethodName(SERVICE, name))
                .setRequestMarshaller(ProtoUtils.marshaller(request))
                .setResponseMarshaller(ProtoUtils.marshaller(answer))
                .build();
    }

    private void serverLive(ServerLiveRequest request, StreamObserver<ServerLiveResponse> answer) {
        get("/v2/health/live", answer, reply -> ServerLiveResponse.newBuilder()
                .setLive(json(reply).get("live").getAsBoolean()).build());
    }

    private void serverReady(ServerReadyRequest request, StreamObserver<ServerReadyResponse> answer) {
        get("/v2/health/ready", answer, reply -> ServerReadyResponse.newBuilder()
                .setReady(json(reply).get("ready").getAsBoolean()).build());
    }

    private void modelReady(ModelReadyRequest request, StreamObserver<ModelReadyResponse> answer) {
        get(modelPath(request.getName(), request.getVersion(), "/ready"), answer,
                reply -> ModelReadyResponse.newBuilder()
                        .setReady(json(reply).get("ready").getAsBoolean()).build());
    }

    private void serverMetadata(ServerMetadataRequest request,
            StreamObserver<ServerMetadataResponse> answer) {
        get("/v2", answer, reply -> {
            JsonObject body = json(reply);
            ServerMetadataResponse.Builder out = ServerMetadataResponse.newBuilder()
                    .setName(body.get("name").getAsString())
                    .setVersion(body.get("version").getAsString());
            body.getAsJsonArray("extensions").forEach(e -> out.addExtensions(e.getAsString()));
            return out.build();
        });
    }

    private void modelMetadata(ModelMetadataRequest request,
            StreamObserver<ModelMetadataResponse> answer) {
        get(modelPath(request.getName(), request.getVersion(), ""), answer, reply -> {
            JsonObject body = json(reply);
            ModelMetadataResponse.Builder out = ModelMetadataResponse.newBuilder()
                    .setName(body.get("name").getAsString())
                    .setPlatform(body.get("platform").getAsString());
            body.getAsJsonArray("versions").forEach(v -> out.addVersions(v.getAsString()));
            body.getAsJsonArray("inputs").forEach(t -> out.addInputs(tensor(t)));
            body.getAsJsonArray("outputs").forEach(t -> out.addOutputs(tensor(t)));
            return out.build();
        });
    }

    private void modelInfer(ModelInferRequest request, StreamObserver<ModelInferResponse> answer) {
        GrpcCall call = GrpcCall.current();
        CompletableFuture<Reply> reply;
        try {
            String path = modelPath(request.getModelName(), request.getModelVersion(), "/infer");
            GrpcTensors.Body body = GrpcTensors.request(request);
            reply = routes.handle("POST", path, body.bytes, Reply.JSON,
                    Integer.toString(body.jsonLength), call.routingKey, null, call.traced);
        } catch (BinaryTensors.BadRequest e) {
            reply = CompletableFuture.completedFuture(Reply.error(e.status, e.getMessage()));
        } catch (StatusRuntimeException e) {
            answer.onError(e);
            return;
        }
        reply.whenComplete((done, error) -> {
            if (done != null) {
                call.answeredBy(done.headers.get(OipRoutes.VERSION_HEADER));
                call.sampledFor(done.headers.get(OipRoutes.SHADOWED_HEADER));
            }
            send(done, error, answer, GrpcTensors::response);
        });
    }

    /** A GET route's answer, translated when it is no error. */
    private <A> void get(String path, StreamObserver<A> answer, Function<Reply, A> translate) {
        CompletableFuture<Reply> reply;
        try {
            reply = routes.handle("GET", path, null, null, null, null, null, Map.of());
        } catch (StatusRuntimeException e) {
            answer.onError(e);
            return;
        }
        reply.whenComplete((done, error) -> send(done, error, answer, translate));
    }

    /**
     * The answer, or the error it is: an HTTP answer other than 200 in Kiln's error shape
     * ({"error": ...}). The readiness routes answer 400 with {"ready": false}: no error.
     */
    private static <A> void send(Reply reply, Throwable failure, StreamObserver<A> answer,
            Function<Reply, A> translate) {
        A translated;
        try {
            if (failure != null) {
                throw failure instanceof RuntimeException ? (RuntimeException) failure
                        : new IllegalStateException(failure);
            }
            String error = reply.status == 200 ? null : errorOf(reply);
            if (error != null) {
                answer.onError(status(reply.status).withDescription(error).asRuntimeException());
                return;
            }
            translated = translate.apply(reply);
        } catch (RuntimeException e) {
            LOG.error("OIP gRPC call failed", e);
            answer.onError(Status.INTERNAL.withDescription("internal error").asRuntimeException());
            return;
        }
        answer.onNext(translated);
        answer.onCompleted();
    }

    /** The gRPC status of an HTTP error status' class. */
    static Status status(int http) {
        switch (http) {
            case 401: return Status.UNAUTHENTICATED;
            case 403: return Status.PERMISSION_DENIED;
            case 404: return Status.NOT_FOUND;
            case 408: case 504: return Status.DEADLINE_EXCEEDED;
            case 413: case 429: return Status.RESOURCE_EXHAUSTED;  // too large, or too many
            case 503: return Status.UNAVAILABLE;
            default:
                return http >= 400 && http < 500 ? Status.INVALID_ARGUMENT : Status.INTERNAL;
        }
    }

    /** An error answer's message; null when the body is no error (a readiness "no"). */
    private static String errorOf(Reply reply) {
        String text = new String(reply.body, StandardCharsets.UTF_8);
        try {
            JsonElement body = JsonParser.parseString(text);
            if (!body.isJsonObject()) {
                return text;
            }
            JsonElement error = body.getAsJsonObject().get("error");
            return error == null ? null : error.isJsonPrimitive() ? error.getAsString()
                    : error.toString();
        } catch (JsonParseException e) {
            return text;
        }
    }

    /**
     * The OIP HTTP path of a model's route (action: "", "/ready" or "/infer"). A name or
     * version an HTTP path could not carry is refused here, in the route's words.
     */
    private static String modelPath(String name, String version, String action) {
        if (name.isEmpty()) {
            throw Status.INVALID_ARGUMENT.withDescription("no model name: name the model")
                    .asRuntimeException();
        }
        if (name.contains("/") || version.contains("/")) {
            throw Status.NOT_FOUND.withDescription("no model '" + name + "'"
                    + (version.isEmpty() ? "" : " version '" + version + "'")).asRuntimeException();
        }
        return "/v2/models/" + name + (version.isEmpty() ? "" : "/versions/" + version) + action;
    }

    private static JsonObject json(Reply reply) {
        return JsonParser.parseString(new String(reply.body, StandardCharsets.UTF_8))
                .getAsJsonObject();
    }

    private static TensorMetadata tensor(JsonElement element) {
        JsonObject tensor = element.getAsJsonObject();
        TensorMetadata.Builder out = TensorMetadata.newBuilder()
                .setName(tensor.get("name").getAsString())
                .setDatatype(tensor.get("datatype").getAsString());
        tensor.getAsJsonArray("shape").forEach(dim -> out.addShape(dim.getAsLong()));
        return out.build();
    }
}
