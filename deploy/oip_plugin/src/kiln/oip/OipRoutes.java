package kiln.oip;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.netty.buffer.ByteBuf;
import io.netty.buffer.ByteBufUtil;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.SocketAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ConcurrentHashMap;
import java.util.function.Supplier;
import org.pytorch.serve.archive.model.ModelException;
import org.pytorch.serve.archive.model.ModelVersionNotFoundException;
import org.pytorch.serve.servingsdk.Model;
import org.pytorch.serve.servingsdk.Worker;
import org.pytorch.serve.servingsdk.impl.ModelServerContext;
import org.pytorch.serve.servingsdk.impl.ModelServerModel;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.ConnectorType;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.wlm.ModelManager;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The Open Inference Protocol routes under /v2, answered from the frontend's own state:
 * readiness from its workers (a model is ready once a worker has loaded it), metadata from the
 * archive's oip-metadata.json (built at archive time by kiln.handlers.oip.tensor_metadata, the one
 * place that knows it), and infer queued to the model's workers as /predictions/NAME is.
 */
final class OipRoutes {

    // As kiln.handlers.oip.METADATA_FILE.
    private static final String METADATA_FILE = "oip-metadata.json";
    // As kiln.handlers.oip.PROTOCOL_HEADER and PROTOCOL.
    static final String PROTOCOL_HEADER = "kiln-protocol";
    static final String PROTOCOL = "oip";
    // As kiln.handlers.handler.VERSION_HEADER: which version answered, passed on to the client.
    static final String VERSION_HEADER = "X-Kiln-Model-Version";
    // Margin over the model's responseTimeout, after which TorchServe itself gives up.
    private static final long TIMEOUT_MARGIN_S = 5;
    private static final Logger LOG = LoggerFactory.getLogger(OipRoutes.class);
    // A loopback connect is answered at once, or refused; only a full accept queue makes it
    // wait, and a server that far behind is not ready either.
    private static final int INFERENCE_CONNECT_TIMEOUT_MS = 1000;

    private final Map<String, JsonObject> metadataByDir = new ConcurrentHashMap<>();
    // What the front proxy asks before it forwards an unpinned REST prediction: GET
    // ROUTE_PREFIX + NAME, answered 200 with the version in ROUTE_HEADER (empty: the default).
    static final String ROUTE_PREFIX = "/kiln-route/";
    static final String ROUTE_HEADER = "X-Kiln-Route-Version";
    // GET ROUTE_PREFIX + NAME/VERSION: whether a pinned REST prediction may go on (ROUTE_HEADER
    // says VERSION) or is refused (empty: the front proxy sends it to REFUSED_PREFIX, which
    // answers the client's 404). GET SYNC_PATH: the state file read now, its SHA-256 back.
    static final String REFUSED_PREFIX = "/kiln-refused/";
    static final String SYNC_PATH = "/kiln-route-sync";
    // The route lookup's answer also names the versions that shadow this request (comma
    // separated; empty: none), and the front proxy then mirrors it to SHADOW_PREFIX.
    static final String SHADOW_HEADER = "X-Kiln-Shadow";
    static final String SHADOW_PREFIX = "/kiln-shadow/";
    // On a shadow's copies of a request (as kiln.handlers.payload_log.COPY_HEADER).
    static final String COPY_HEADER = "kiln-shadow-copy";
    // On a sampled answer (OIP here, REST from the front proxy): the versions it was sampled
    // for, comma separated, so that a client can tell its shadowed requests from the others.
    static final String SHADOWED_HEADER = "X-Kiln-Shadowed";
    // As kiln.handlers.forms.FORM_TYPE_HEADER.
    static final String FORM_TYPE_HEADER = "kiln-form-type";

    private final RequestLimits limits;
    private final Router router;
    private final Shadow shadow;

    OipRoutes(RequestLimits limits, Router router, Shadow shadow) {
        this.limits = limits;
        this.router = router;
        this.shadow = shadow;
    }

    /**
     * path: the request path, /v2 included; body: null for a GET, else Netty's buffer, only
     * read, and released by the caller once the answer completes; binaryHeader: the request's
     * Inference-Header-Content-Length, or null; routingKey: the client's Router.KEY_HEADER, or
     * null; formType: the front proxy's kiln-form-type of a REST body, or null; traced: what
     * an infer passes to the worker (Traced.of). Only infer is answered later; the other
     * routes answer from the frontend's state at once.
     */
    CompletableFuture<Reply> handle(String method, String path, ByteBuf body, String contentType,
            String binaryHeader, String routingKey, String formType, Map<String, String> traced) {
        if (path.startsWith(ROUTE_PREFIX) && method.equals("GET")) {
            return now(routed(path.substring(ROUTE_PREFIX.length()), routingKey));
        }
        if (path.startsWith(SHADOW_PREFIX) && method.equals("POST")) {
            return now(shadowRest(path.substring(SHADOW_PREFIX.length()), body, contentType, formType));
        }
        if (path.equals(SYNC_PATH) && method.equals("GET")) {
            JsonObject synced = new JsonObject();
            synced.addProperty("sha256", router.sync());
            return now(Reply.json(200, synced));
        }
        if (path.startsWith(REFUSED_PREFIX)) {
            String[] pinned = path.substring(REFUSED_PREFIX.length()).split("/", 2);
            return now(retired(pinned[0], pinned.length > 1 ? pinned[1] : ""));
        }
        List<String> parts = segments(path);
        if (parts == null) {
            return now(Reply.error(404, "no such route: " + path + " (the protocol is under /v2)"));
        }
        if (method.equals("POST")) {
            ModelRoute route = ModelRoute.parse(parts);
            if (route == null || !route.action.equals("infer")) {
                return now(Reply.error(405, "POST is only for /v2/models/NAME/infer"));
            }
            List<String> shadows = List.of();
            if (route.version == null) {  // unpinned: the route picks the version
                route = route.withVersion(servedOrNull(route.name, router.pick(route.name, routingKey)));
                shadows = router.shadowsOf(route.name, versionOf(route.name, route.version));
            }
            Reply missing = missingModel(route);
            return missing != null ? now(missing)
                    : infer(route, body, contentType, binaryHeader, shadows, traced);
        }
        return now(get(method, path, parts));
    }

    private Reply get(String method, String path, List<String> parts) {
        if (!method.equals("GET")) {
            return Reply.error(405, method + " is not allowed on /v2");
        }
        if (parts.isEmpty()) {
            return Reply.json(200, serverMetadata());
        } else if (parts.equals(List.of("health", "live"))) {
            return Reply.json(200, flag("live", true));
        } else if (parts.equals(List.of("health", "ready"))) {
            boolean ready = serverReady(models(), ConfigManager.getInstance().getLoadModels())
                    && inferenceListening();
            return Reply.json(ready ? 200 : 400, flag("ready", ready));
        }
        ModelRoute route = ModelRoute.parse(parts);
        if (route == null) {
            return Reply.error(404, "no such route: " + path);
        }
        Reply missing = missingModel(route);
        return missing != null ? missing : getModelRoute(route);
    }

    /**
     * A 404 unless route names a served model (and one of its served versions, if any, which
     * the state file, when it records the model, still records).
     */
    private Reply missingModel(ModelRoute route) {
        if (route.version != null && router.refuses(route.name, route.version)) {
            return retired(route.name, route.version);
        }
        if (served(route.name, route.version) == null) {
            return Reply.error(404, "no model " + route.describe());
        }
        return null;
    }

    private Reply getModelRoute(ModelRoute route) {
        org.pytorch.serve.wlm.Model served = served(route.name, route.version);
        if (route.action.isEmpty()) {
            return modelMetadata(served);
        }
        if (route.action.equals("ready")) {
            boolean ready = isReady(new ModelServerModel(served));
            JsonObject body = flag("ready", ready);
            body.addProperty("name", route.name);
            // OIP health routes: 200 means true, a 4xx means false.
            return Reply.json(ready ? 200 : 400, body);
        }
        return Reply.error(405, "GET is not allowed on /v2/models/NAME/" + route.action);
    }

    /**
     * The server is ready when every model it was started with is registered and ready. Right
     * after start no model is registered yet: "all of none are ready" must not read as ready.
     */
    static boolean serverReady(Map<String, Model> models, String loadModels) {
        List<String> expected = startupModels(loadModels);
        if (expected == null) {  // "all" (or nothing named): every model registered so far
            return !models.isEmpty() && models.values().stream().allMatch(OipRoutes::isReady);
        }
        return expected.stream().allMatch(name -> {
            Model model = models.get(name);
            return model != null && isReady(model);
        });
    }

    /**
     * Whether TorchServe's inference port accepts a connection (the kernel answers for a
     * listening socket, however busy TorchServe is). TorchServe whose start failed on a port it
     * binds after its REST ports (management, metrics, gRPC: taken by another process) closes
     * its REST listeners at once, then takes seconds to exit, its workers loading and this
     * server answering all the while: its models alone would say ready while every prediction
     * sent through the front proxy got 502.
     */
    private static boolean inferenceListening() {
        SocketAddress address = ConfigManager.getInstance()
                .getListener(ConnectorType.INFERENCE_CONNECTOR).getSocketAddress();
        if (!(address instanceof InetSocketAddress)) {
            return true;  // a Unix socket: not how Kiln runs TorchServe
        }
        try (Socket socket = new Socket()) {
            socket.connect(address, INFERENCE_CONNECT_TIMEOUT_MS);
            return true;
        } catch (IOException e) {
            return false;
        }
    }

    /**
     * Model names in config.properties' load_models ("a.mar,b.mar" or "name=file.mar,..."),
     * or null when it says "all" or names nothing.
     */
    static List<String> startupModels(String loadModels) {
        if (loadModels == null || loadModels.isBlank()
                || loadModels.trim().equalsIgnoreCase("all")) {
            return null;
        }
        List<String> names = new ArrayList<>();
        for (String entry : loadModels.split(",")) {
            String item = entry.trim();
            if (item.isEmpty()) {
                continue;
            }
            int eq = item.indexOf('=');
            String name = eq >= 0 ? item.substring(0, eq) : item;
            name = name.substring(name.lastIndexOf('/') + 1);
            names.add(name.endsWith(".mar") ? name.substring(0, name.length() - 4) : name);
        }
        return names.isEmpty() ? null : names;
    }

    /** A model is ready when one of its workers has loaded it, not merely started. */
    static boolean isReady(Model model) {
        return model.getModelWorkers().stream().anyMatch(Worker::isRunning);
    }

    private static Map<String, Model> models() {
        return new ModelServerContext().getModels();
    }

    private static Reply retired(String name, String version) {
        return Reply.error(404, "model '" + name + "' version '" + version
                + "' is not served: it is not in the versions file (retired)");
    }

    /**
     * The version the route picks for an unpinned REST prediction; an empty one (the default)
     * when the model has no route or the picked version is not registered (any other answer
     * than 2xx would be the client's 500: nginx's auth_request).
     */
    private Reply routed(String name, String routingKey) {
        int slash = name.indexOf('/');
        if (slash >= 0) {  // NAME/VERSION: a pinned prediction goes on unless refused
            String model = name.substring(0, slash);
            String pinned = name.substring(slash + 1);
            return Reply.json(200, new JsonObject())
                    .withHeader(ROUTE_HEADER, router.refuses(model, pinned) ? "" : pinned);
        }
        String version = servedOrNull(name, router.pick(name, routingKey));
        List<String> shadows = router.shadowsOf(name, versionOf(name, version));
        return Reply.json(200, new JsonObject())
                .withHeader(ROUTE_HEADER, version == null ? "" : version)
                .withHeader(SHADOW_HEADER, String.join(",", shadows));
    }

    /**
     * A REST prediction the front proxy mirrored because the route lookup drew shadows for it
     * (nginx's mirror: the client's request goes on without waiting for this one's body, and
     * this answer comes at once, so the client's next request on its connection, which nginx
     * holds until the mirror's answer is in, waits for a loopback exchange, never for a
     * model). path: NAME/CANDIDATES[/PRIMARY], PRIMARY absent for the default version. The
     * primary answer is computed again here on the same body, since the client's answer never
     * passes the plugin: for a deterministic model (any served by Kiln: eval mode, fixed
     * weights) it is the answer the client got.
     */
    private Reply shadowRest(String path, ByteBuf body, String contentType, String formType) {
        List<String> parts = new ArrayList<>(Arrays.asList(path.split("/")));
        parts.removeIf(String::isEmpty);
        if (parts.size() < 2 || parts.size() > 3 || body == null) {
            return Reply.error(404, "no such route: " + SHADOW_PREFIX + path);
        }
        String name = parts.get(0);
        String primary = versionOf(name, parts.size() == 3 ? parts.get(2) : null);
        if (primary == null) {
            return Reply.error(404, "no model '" + name + "' to shadow");
        }
        byte[] bytes = ByteBufUtil.getBytes(body);
        Supplier<RequestInput> input = () -> copy(restInput(bytes, contentType, formType));
        ModelRoute routed = pinned(name, primary);
        for (String candidate : parts.get(1).split(",")) {
            shadow.score(name, candidate, () -> Shadow.time(() -> submit(routed, input.get())),
                    () -> Shadow.time(() -> submit(pinned(name, candidate), input.get())));
        }
        return Reply.json(202, new JsonObject());
    }

    static ModelRoute pinned(String name, String version) {
        return ModelRoute.parse(List.of("models", name, "versions", version, "infer"));
    }

    /** The name of the version `version` of `name` (its default when null); null if none. */
    static String versionOf(String name, String version) {
        org.pytorch.serve.wlm.Model model = served(name, version);
        return model == null ? null : model.getVersion();
    }

    /** `version` when `name` serves it, else null (the default version). */
    static String servedOrNull(String name, String version) {
        return version != null && served(name, version) != null ? version : null;
    }

    /** The model's version `version`, its default one when null; null when not served. */
    private static org.pytorch.serve.wlm.Model served(String name, String version) {
        try {
            return ModelManager.getInstance().getModel(name, version);
        } catch (ModelVersionNotFoundException e) {
            return null;
        }
    }

    // --- infer ------------------------------------------------------------------------------

    /**
     * Queues the body to the model's workers; the answer completes off the caller's thread.
     * A request using the binary tensor extension has its JSON header read on a pool
     * thread, not here; its body goes on as it came. The body leaves Netty's buffer for the
     * heap only once admitted: TorchServe's RequestInput holds a byte[] and nothing else.
     */
    private CompletableFuture<Reply> infer(ModelRoute route, ByteBuf body, String contentType,
            String binaryHeader, List<String> shadows, Map<String, String> traced) {
        if (binaryHeader == null && !BinaryTensors.mayUse(body)) {
            byte[] bytes = ByteBufUtil.getBytes(body);
            return submitShadowed(route, shadows,
                    () -> Traced.pass(traced, requestInput(bytes, contentType)));
        }
        return CompletableFuture.supplyAsync(() -> {
            try {
                return BinaryTensors.parse(body, binaryHeader, limits);
            } catch (BinaryTensors.BadRequest e) {
                throw new CompletionException(e);
            }
        }).thenCompose(binary -> {
            byte[] bytes = ByteBufUtil.getBytes(body);
            return binary == null
                    ? submitShadowed(route, shadows,
                            () -> Traced.pass(traced, requestInput(bytes, contentType)))
                    : submitShadowed(route, shadows,
                            () -> Traced.pass(traced, binaryInput(bytes, binary)))
                            .thenApply(binary::answer);
        })
                .exceptionally(e -> e.getCause() instanceof BinaryTensors.BadRequest
                        ? Reply.error(((BinaryTensors.BadRequest) e.getCause()).status,
                                e.getCause().getMessage())
                        : failed(route.name, e));
    }

    /**
     * The primary's answer, and each shadow's scored against it beside it. Each job gets an
     * input of its own over the same bytes, which nothing changes once queued.
     */
    private CompletableFuture<Reply> submitShadowed(ModelRoute route, List<String> shadows,
            Supplier<RequestInput> input) {
        if (shadows.isEmpty()) {
            return submit(route, input.get());
        }
        CompletableFuture<Shadow.Timed> primary = Shadow.time(() -> submit(route, input.get()));
        for (String candidate : shadows) {
            shadow.score(route.name, candidate, () -> primary,
                    () -> Shadow.time(() -> submit(route.withVersion(candidate),
                            copy(input.get()))));
        }
        String sampled = String.join(",", shadows);
        return primary.thenApply(timed -> timed.reply.withHeader(SHADOWED_HEADER, sampled));
    }

    static CompletableFuture<Reply> submit(ModelRoute route, RequestInput input) {
        org.pytorch.serve.wlm.Model model = served(route.name, route.version);
        if (model == null) {  // retired since missingModel looked
            return now(Reply.error(404, "no model " + route.describe()));
        }
        WorkerJob job = new WorkerJob(route.name, route.version, input);
        try {
            if (!ModelManager.getInstance().addJob(job)) {
                return now(Reply.error(503, "model " + route.describe()
                        + " has no worker or its queue is full").withHeader("Retry-After", "1"));
            }
        } catch (ModelException e) {
            return now(Reply.error(404, e.getMessage()));
        }
        return job.reply(model.getResponseTimeout() + TIMEOUT_MARGIN_S);
    }

    private static Reply failed(String name, Throwable e) {
        LOG.error("OIP infer on model {} failed", name, e);
        return Reply.error(500, "internal error");
    }

    /**
     * A body with binary inputs as raw bytes (never parsed as JSON on the way), marked with
     * where its JSON header ends.
     */
    private static RequestInput binaryInput(byte[] body, BinaryTensors binary) {
        if (!binary.hasBinaryInputs()) {
            return requestInput(body, Reply.JSON);
        }
        RequestInput input = requestInput(body, BinaryTensors.OCTET_STREAM);
        input.updateHeaders(BinaryTensors.WORKER_HEADER, Integer.toString(binary.jsonLength()));
        return input;
    }

    /** A REST prediction's input as TorchServe's /predictions queues it behind Kiln's proxy. */
    private static RequestInput restInput(byte[] body, String contentType, String formType) {
        RequestInput input = new RequestInput(UUID.randomUUID().toString());
        input.addParameter(new BodyParameter(body, contentType == null ? "" : contentType));
        if (formType != null && !formType.isEmpty()) {
            input.updateHeaders(FORM_TYPE_HEADER, formType);
        }
        return input;
    }

    /**
     * A shadow's copy of a client's request, marked so that the handler's payload log leaves it
     * out (handlers/payload_log.py: the client's request is logged once, by its own worker).
     */
    private static RequestInput copy(RequestInput input) {
        input.updateHeaders(COPY_HEADER, "1");
        return input;
    }

    private static RequestInput requestInput(byte[] body, String contentType) {
        // TorchServe's worker parses application/json bodies; OIP bodies are JSON by definition.
        String type = contentType == null || contentType.isEmpty() ? Reply.JSON : contentType;
        RequestInput input = new RequestInput(UUID.randomUUID().toString());
        input.addParameter(new BodyParameter(body, type));
        // The handler picks the protocol by this mark, never by what the body looks like.
        input.updateHeaders(PROTOCOL_HEADER, PROTOCOL);
        return input;
    }

    // --- metadata ---------------------------------------------------------------------------

    private static JsonObject serverMetadata() {
        JsonObject body = new JsonObject();
        body.addProperty("name", "kiln");
        body.addProperty("version", ConfigManager.getInstance().getVersion());
        JsonArray extensions = new JsonArray();
        extensions.add("binary_tensor_data");  // BinaryTensors: Triton's clients' default
        body.add("extensions", extensions);
        return body;
    }

    private Reply modelMetadata(org.pytorch.serve.wlm.Model model) {
        String name = model.getModelName();
        Path dir = model.getModelDir().toPath();
        // A model's folder does not change once extracted: read its metadata once.
        JsonObject tensors = metadataByDir.computeIfAbsent(dir.toString(), k -> readMetadata(dir));
        if (tensors == null) {
            return Reply.error(404, "model " + name + " has no " + METADATA_FILE
                    + ": it was not archived by kiln archive");
        }
        JsonObject body = new JsonObject();
        body.addProperty("name", name);
        JsonArray versions = new JsonArray();
        versions.add(model.getVersion());
        body.add("versions", versions);
        tensors.entrySet().forEach(entry -> body.add(entry.getKey(), entry.getValue()));
        return Reply.json(200, body);
    }

    /** The archive's platform, inputs and outputs; null when it has none. */
    private static JsonObject readMetadata(Path dir) {
        Path file = dir.resolve(METADATA_FILE);
        if (!Files.isRegularFile(file)) {
            return null;
        }
        try {
            return JsonParser.parseString(Files.readString(file, StandardCharsets.UTF_8))
                    .getAsJsonObject();
        } catch (IOException e) {
            throw new IllegalStateException("cannot read " + file, e);
        }
    }

    // --- plumbing ---------------------------------------------------------------------------

    /** The path after /v2, without empty segments; null when it is not under /v2. */
    private static List<String> segments(String path) {
        List<String> parts = new ArrayList<>(Arrays.asList(path.split("/")));
        parts.removeIf(String::isEmpty);
        if (parts.isEmpty() || !parts.get(0).equals("v2")) {
            return null;
        }
        return parts.subList(1, parts.size());
    }

    private static CompletableFuture<Reply> now(Reply reply) {
        return CompletableFuture.completedFuture(reply);
    }

    private static JsonObject flag(String name, boolean value) {
        JsonObject body = new JsonObject();
        body.addProperty(name, value);
        return body;
    }
}
