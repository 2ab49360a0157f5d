package kiln.oip;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.netty.buffer.ByteBuf;
import io.netty.buffer.ByteBufUtil;
import java.io.IOException;
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
import org.pytorch.serve.archive.model.ModelException;
import org.pytorch.serve.servingsdk.Model;
import org.pytorch.serve.servingsdk.Worker;
import org.pytorch.serve.servingsdk.impl.ModelServerContext;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.wlm.ModelManager;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The Open Inference Protocol routes under /v2, answered from the frontend's own state:
 * readiness from its workers (a model is ready once a worker has loaded it), metadata from the
 * model's signature.json, and infer queued to the model's workers as /predictions/NAME is.
 */
final class OipRoutes {

    private static final String SIGNATURE_FILE = "signature.json";
    // As kiln.handlers.oip.PROTOCOL_HEADER and PROTOCOL.
    static final String PROTOCOL_HEADER = "kiln-protocol";
    static final String PROTOCOL = "oip";
    // Kiln's handler answers each row with its label: a string tensor beside the probabilities.
    private static final String LABEL_OUTPUT = "label";
    // Margin over the model's responseTimeout, after which TorchServe itself gives up.
    private static final long TIMEOUT_MARGIN_S = 5;
    private static final Logger LOG = LoggerFactory.getLogger(OipRoutes.class);

    private final Map<String, JsonObject> signatureByDir = new ConcurrentHashMap<>();
    private final RequestLimits limits;

    OipRoutes(RequestLimits limits) {
        this.limits = limits;
    }

    /**
     * path: the request path, /v2 included; body: null for a GET, else Netty's buffer, only
     * read, and released by the caller once the answer completes; binaryHeader: the request's
     * Inference-Header-Content-Length, or null. Only infer is answered later; the other routes
     * answer from the frontend's state at once.
     */
    CompletableFuture<Reply> handle(String method, String path, ByteBuf body, String contentType,
            String binaryHeader) {
        List<String> parts = segments(path);
        if (parts == null) {
            return now(Reply.error(404, "no such route: " + path + " (the protocol is under /v2)"));
        }
        if (method.equals("POST")) {
            ModelRoute route = ModelRoute.parse(parts);
            if (route == null || !route.action.equals("infer")) {
                return now(Reply.error(405, "POST is only for /v2/models/NAME/infer"));
            }
            Reply missing = missingModel(route);
            return missing != null ? now(missing) : infer(route.name, body, contentType, binaryHeader);
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
            boolean ready = serverReady(models(), ConfigManager.getInstance().getLoadModels());
            return Reply.json(ready ? 200 : 400, flag("ready", ready));
        }
        ModelRoute route = ModelRoute.parse(parts);
        if (route == null) {
            return Reply.error(404, "no such route: " + path);
        }
        Reply missing = missingModel(route);
        return missing != null ? missing : getModelRoute(route);
    }

    /** A 404 unless route names a served model (and its served version, if any). */
    private static Reply missingModel(ModelRoute route) {
        org.pytorch.serve.wlm.Model model = served(route.name);
        if (model == null || !route.versionMatches(model.getVersion())) {
            return Reply.error(404, "no model " + route.describe());
        }
        return null;
    }

    private Reply getModelRoute(ModelRoute route) {
        if (route.action.isEmpty()) {
            return Reply.json(200, modelMetadata(route.name));
        }
        if (route.action.equals("ready")) {
            Model model = models().get(route.name);
            boolean ready = model != null && isReady(model);
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

    private static org.pytorch.serve.wlm.Model served(String name) {
        return ModelManager.getInstance().getDefaultModels().get(name);
    }

    // --- infer ------------------------------------------------------------------------------

    /**
     * Queues the body to the model's workers; the answer completes off the caller's thread.
     * A request using the binary tensor extension has its JSON header read on a pool
     * thread, not here; its body goes on as it came. The body leaves Netty's buffer for the
     * heap only once admitted: TorchServe's RequestInput holds a byte[] and nothing else.
     */
    private CompletableFuture<Reply> infer(String name, ByteBuf body, String contentType,
            String binaryHeader) {
        if (binaryHeader == null && !BinaryTensors.mayUse(body)) {
            return submit(name, requestInput(ByteBufUtil.getBytes(body), contentType));
        }
        return CompletableFuture.supplyAsync(() -> {
            try {
                return BinaryTensors.parse(body, binaryHeader, limits);
            } catch (BinaryTensors.BadRequest e) {
                throw new CompletionException(e);
            }
        }).thenCompose(binary -> binary == null
                ? submit(name, requestInput(ByteBufUtil.getBytes(body), contentType))
                : submit(name, binaryInput(ByteBufUtil.getBytes(body), binary))
                        .thenApply(binary::answer))
                .exceptionally(e -> e.getCause() instanceof BinaryTensors.BadRequest
                        ? Reply.error(((BinaryTensors.BadRequest) e.getCause()).status,
                                e.getCause().getMessage())
                        : failed(name, e));
    }

    private static CompletableFuture<Reply> submit(String name, RequestInput input) {
        WorkerJob job = new WorkerJob(name, input);
        try {
            if (!ModelManager.getInstance().addJob(job)) {
                return now(Reply.error(503, "model '" + name + "' has no worker or its queue is full")
                        .withHeader("Retry-After", "1"));
            }
        } catch (ModelException e) {
            return now(Reply.error(404, e.getMessage()));
        }
        return job.reply(served(name).getResponseTimeout() + TIMEOUT_MARGIN_S);
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

    private JsonObject modelMetadata(String name) {
        org.pytorch.serve.wlm.Model model = served(name);
        Path dir = model.getModelDir().toPath();
        // A model's folder does not change once extracted: read its signature once.
        JsonObject signature = signatureByDir.computeIfAbsent(dir.toString(), k -> readSignature(dir));
        JsonObject body = new JsonObject();
        body.addProperty("name", name);
        JsonArray versions = new JsonArray();
        versions.add(model.getVersion());
        body.add("versions", versions);
        body.addProperty("platform", "kiln");
        body.add("inputs", inputTensors(signature));
        body.add("outputs", outputTensors(signature));
        return body;
    }

    private static JsonObject readSignature(Path dir) {
        try {
            String text = Files.readString(dir.resolve(SIGNATURE_FILE), StandardCharsets.UTF_8);
            return JsonParser.parseString(text).getAsJsonObject();
        } catch (IOException e) {
            throw new IllegalStateException("cannot read " + dir.resolve(SIGNATURE_FILE), e);
        }
    }

    /**
     * What infer takes, one tensor per signature input (signature version 2): raw pixels
     * [-1, H, W] (or [-1, H, W, C]) and raw features [-1, F] as FP32, before preprocess; a
     * tensor input with its declared shape and dtype. As kiln.handlers.oip.model_metadata.
     */
    static JsonArray inputTensors(JsonObject signature) {
        JsonArray tensors = new JsonArray();
        for (JsonElement element : signature.getAsJsonArray("inputs")) {
            JsonObject input = element.getAsJsonObject();
            String kind = input.get("kind").getAsString();
            JsonArray shape = new JsonArray();
            shape.add(-1);
            String datatype = "FP32";
            if ("image".equals(kind)) {
                input.getAsJsonArray("size").forEach(shape::add);
                int channels = input.get("channels").getAsInt();
                if (channels > 1) {
                    shape.add(channels);
                }
            } else if ("features".equals(kind)) {
                shape.add(input.getAsJsonArray("names").size());
            } else {
                JsonArray declared = input.getAsJsonArray("shape");
                for (int i = 1; i < declared.size(); i++) {
                    shape.add(declared.get(i));
                }
                datatype = datatype(input.get("dtype").getAsString());
            }
            tensors.add(tensor(input.get("name").getAsString(), datatype, shape));
        }
        return tensors;
    }

    /** float32 -> FP32, int64 -> INT64, uint8 -> UINT8 (the dtypes a signature may declare). */
    static String datatype(String dtype) {
        return dtype.startsWith("float") ? "FP" + dtype.substring(5) : dtype.toUpperCase();
    }

    /**
     * By output kind: one probability per label (binary models too) and the predicted label
     * per row; or the values (regression, raw) under the output's name.
     */
    static JsonArray outputTensors(JsonObject signature) {
        JsonObject output = signature.getAsJsonObject("output");
        String kind = output.get("kind").getAsString();
        String name = output.get("name").getAsString();
        JsonArray tensors = new JsonArray();
        if ("raw".equals(kind)) {
            tensors.add(tensor(name, "FP32", output.getAsJsonArray("shape")));
            return tensors;
        }
        JsonArray values = new JsonArray();
        values.add(-1);
        if ("regression".equals(kind)) {
            values.add(output.getAsJsonArray("names").size());
            tensors.add(tensor(name, "FP32", values));
            return tensors;
        }
        values.add(output.getAsJsonArray("labels").size());
        JsonArray labels = new JsonArray();
        labels.add(-1);
        tensors.add(tensor(name, "FP32", values));
        tensors.add(tensor(LABEL_OUTPUT, "BYTES", labels));
        return tensors;
    }

    private static JsonObject tensor(String name, String datatype, JsonArray shape) {
        JsonObject tensor = new JsonObject();
        tensor.addProperty("name", name);
        tensor.addProperty("datatype", datatype);
        tensor.add("shape", shape);
        return tensor;
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
