package kiln.oip;

import com.google.protobuf.Empty;
import io.grpc.Status;
import io.grpc.stub.StreamObserver;
import java.util.List;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import org.pytorch.serve.grpc.inference.InferenceAPIsServiceGrpc.InferenceAPIsServiceImplBase;
import org.pytorch.serve.grpc.inference.PredictionResponse;
import org.pytorch.serve.grpc.inference.PredictionsRequest;
import org.pytorch.serve.grpc.inference.TorchServeHealthResponse;
import org.pytorch.serve.grpcimpl.InferenceImpl;
import org.pytorch.serve.util.messages.InputParameter;
import org.pytorch.serve.util.messages.RequestInput;

/**
 * TorchServe's InferenceAPIsService with Kiln's versions: a Predictions call without a
 * model_version follows the model's route (its weights; the x-kiln-routing-key metadata as
 * REST's X-Kiln-Routing-Key), one pinned to a version the state file no longer records is
 * NOT_FOUND (as REST's 404), a sampled unpinned call is also scored by the model's shadows,
 * and every answer names the version that gave it (GrpcCall). TorchServe's own InferenceImpl
 * does the rest, so that answers and errors read as on TorchServe's gRPC port.
 */
final class GrpcInference extends InferenceAPIsServiceImplBase {

    private final InferenceImpl torchserve = new InferenceImpl();
    private final Router router;
    private final Shadow shadow;

    GrpcInference(Router router, Shadow shadow) {
        this.router = router;
        this.shadow = shadow;
    }

    @Override
    public void ping(Empty request, StreamObserver<TorchServeHealthResponse> answer) {
        torchserve.ping(request, answer);
    }

    @Override
    public void predictions(PredictionsRequest request, StreamObserver<PredictionResponse> answer) {
        GrpcCall call = GrpcCall.current();
        String name = request.getModelName();
        String pinned = request.getModelVersion();
        if (!pinned.isEmpty()) {
            if (router.refuses(name, pinned)) {
                answer.onError(Status.NOT_FOUND.withDescription("model '" + name + "' version '"
                        + pinned + "' is not served: it is not in the versions file (retired)")
                        .asRuntimeException());
                return;
            }
            call.answeredBy(OipRoutes.versionOf(name, pinned));
            torchserve.predictions(request, answer);
            return;
        }
        String routed = OipRoutes.servedOrNull(name, router.pick(name, call.routingKey));
        String version = OipRoutes.versionOf(name, routed);  // the default's when not routed
        call.answeredBy(version);
        List<String> shadows = router.shadowsOf(name, version);
        if (!shadows.isEmpty()) {
            shadowed(call, request, shadows);
        }
        torchserve.predictions(routed == null ? request
                : request.toBuilder().setModelVersion(routed).build(), answer);
    }

    /** Streamed answers come from the version asked for, or the default: no route. */
    @Override
    public void streamPredictions(PredictionsRequest request,
            StreamObserver<PredictionResponse> answer) {
        String pinned = request.getModelVersion();
        GrpcCall.current().answeredBy(OipRoutes.versionOf(request.getModelName(),
                pinned.isEmpty() ? null : pinned));
        torchserve.streamPredictions(request, answer);
    }

    @Override
    public StreamObserver<PredictionsRequest> streamPredictions2(
            StreamObserver<PredictionResponse> answer) {
        return torchserve.streamPredictions2(answer);
    }

    /**
     * Has each of `shadows` also score the call, against the answer the client gets, which
     * it never delays: the candidates' jobs are queued beside it and their
     * answers compared off the client's path (Shadow).
     */
    private void shadowed(GrpcCall call, PredictionsRequest request, List<String> shadows) {
        call.sampledFor(String.join(",", shadows));
        CompletableFuture<Shadow.Timed> answered = Shadow.time(call::answer);
        String name = request.getModelName();
        for (String candidate : shadows) {
            shadow.score(name, candidate, () -> answered, () -> Shadow.time(
                    () -> OipRoutes.submit(OipRoutes.pinned(name, candidate), input(request))));
        }
    }

    /** The worker's input as TorchServe's InferenceImpl builds it: one parameter per entry. */
    private static RequestInput input(PredictionsRequest request) {
        RequestInput input = new RequestInput(UUID.randomUUID().toString());
        request.getInputMap().forEach(
                (key, value) -> input.addParameter(new InputParameter(key, value.toByteArray())));
        return input;
    }
}
