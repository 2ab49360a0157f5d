package kiln.oip;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ThreadLocalRandom;
import java.util.zip.CRC32;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Which version an unpinned request goes to: the model's route in the run folder's state file
 * (run/versions.json, written atomically by Kiln's admin commands, deploy/versions.py). The
 * file (a few hundred bytes) is read at most every CHECK_EVERY_NS and parsed when its text
 * changed, so a route change takes effect within that without reloading the front proxy, which
 * would close kept-alive client connections (loadtests/studies/reload_keepalive.py). Its
 * modification time cannot tell: two writes within one kernel tick share it, and an
 * atomically replaced file of the same size may reuse the inode.
 */
final class Router {

    /** The state file's path, set with -Dkiln.route.state=... in config.properties' vmargs. */
    static final String STATE_PROPERTY = "kiln.route.state";
    /** A client's routing key: the same key always lands on the same version of a route. */
    static final String KEY_HEADER = "X-Kiln-Routing-Key";
    private static final long CHECK_EVERY_NS = 100_000_000L;
    private static final Logger LOG = LoggerFactory.getLogger(Router.class);

    private final Path state;
    private volatile Map<String, Map<String, Double>> weights = Map.of();
    // Per model, version -> the fraction of the requests routed elsewhere it also scores.
    private volatile Map<String, Map<String, Double>> shadows = Map.of();
    // Per model in the file, the versions it records: a pinned request to another is refused.
    private volatile Map<String, Set<String>> recorded = Map.of();
    private volatile long checkedAt = System.nanoTime() - CHECK_EVERY_NS;
    private String text = "";

    Router(Path state) {
        this.state = state;
    }

    static Router fromProperty() {
        String path = System.getProperty(STATE_PROPERTY);
        return new Router(path == null ? null : Path.of(path));
    }

    /** The version to serve `model` with; null for TorchServe's default version. */
    String pick(String model, String key) {
        Map<String, Double> route = current().get(model);
        if (route == null || route.isEmpty()) {
            return null;
        }
        double total = route.values().stream().mapToDouble(Double::doubleValue).sum();
        double at = fraction(key) * total;
        String last = null;
        for (Map.Entry<String, Double> entry : route.entrySet()) {
            last = entry.getKey();
            at -= entry.getValue();
            if (at < 0) {
                return last;
            }
        }
        return last;  // rounding at the very top end
    }

    /**
     * The versions that also score this request, routed to `primary`: each of the model's
     * shadows but `primary`, drawn with its fraction; empty for most requests.
     */
    List<String> shadowsOf(String model, String primary) {
        refresh();
        Map<String, Double> given = shadows.get(model);
        if (given == null || primary == null) {
            return List.of();
        }
        List<String> out = new ArrayList<>();
        ThreadLocalRandom random = ThreadLocalRandom.current();
        given.forEach((version, fraction) -> {
            if (!version.equals(primary) && random.nextDouble() < fraction) {
                out.add(version);
            }
        });
        return out;
    }

    /**
     * Whether a request pinned to `version` of `model` is refused: the state file records the
     * model but not that version (retired, or being retired: it stops taking requests before
     * its last ones are drained and it is unregistered).
     */
    boolean refuses(String model, String version) {
        Set<String> known = currentRecorded().get(model);
        return known != null && !known.contains(version);
    }

    /**
     * Reads the state file now, so that every pick from here on follows it, and returns the
     * SHA-256 of the text in force ("" without a file): an admin command that wrote the file
     * asks this before it acts on what the routes no longer send (kiln retire drains then).
     */
    synchronized String sync() {
        if (state == null) {
            return "";
        }
        reload();
        checkedAt = System.nanoTime();
        try {
            return text.isEmpty() ? "" : String.format("%064x", new BigInteger(1, MessageDigest
                    .getInstance("SHA-256").digest(text.getBytes(StandardCharsets.UTF_8))));
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException("every JVM has SHA-256", e);
        }
    }

    /** Where in [0, 1) a request falls: by its key's hash, or at random without one. */
    private static double fraction(String key) {
        if (key == null || key.isEmpty()) {
            return ThreadLocalRandom.current().nextDouble();
        }
        CRC32 crc = new CRC32();
        crc.update(key.getBytes(StandardCharsets.UTF_8));
        return crc.getValue() / (double) (1L << 32);
    }

    private Map<String, Map<String, Double>> current() {
        refresh();
        return weights;
    }

    private Map<String, Set<String>> currentRecorded() {
        refresh();
        return recorded;
    }

    private void refresh() {
        long now = System.nanoTime();
        if (state == null || now - checkedAt < CHECK_EVERY_NS) {
            return;
        }
        synchronized (this) {
            if (now - checkedAt >= CHECK_EVERY_NS) {
                reload();
                checkedAt = now;
            }
        }
    }

    /** Parses the file when its text changed; a bad one keeps the routes in force. */
    private void reload() {
        try {
            String now = Files.readString(state);
            if (now.equals(text)) {
                return;
            }
            JsonObject root = JsonParser.parseString(now).getAsJsonObject();
            Map<String, Map<String, Double>> parsed = parse(root);
            shadows = parseShadows(root);
            recorded = recorded(root);
            weights = parsed;
            text = now;
        } catch (NoSuchFileException e) {
            weights = Map.of();
            shadows = Map.of();
            recorded = Map.of();
            text = "";
        } catch (IOException | RuntimeException e) {
            LOG.warn("cannot read the route state {}: keeping the routes in force", state, e);
        }
    }

    /**
     * Per model, version -> weight: its route's positive weights, or its default alone. The
     * state file says, per model: {"versions": {...}, "default": V, "route": {V: w}|null, ...}.
     */
    static Map<String, Map<String, Double>> parse(JsonObject root) {
        Map<String, Map<String, Double>> out = new LinkedHashMap<>();
        for (Map.Entry<String, JsonElement> model : root.entrySet()) {
            JsonObject entry = model.getValue().getAsJsonObject();
            Map<String, Double> route = new LinkedHashMap<>();
            JsonElement given = entry.get("route");
            if (given != null && given.isJsonObject()) {
                for (Map.Entry<String, JsonElement> w : given.getAsJsonObject().entrySet()) {
                    if (w.getValue().getAsDouble() > 0) {
                        route.put(w.getKey(), w.getValue().getAsDouble());
                    }
                }
            }
            JsonElement fallback = entry.get("default");
            if (route.isEmpty() && fallback != null && fallback.isJsonPrimitive()) {
                route.put(fallback.getAsString(), 1.0);
            }
            out.put(model.getKey(), route);
        }
        return out;
    }

    /** Per model, version -> its shadow fraction: the state file's "shadows". */
    static Map<String, Map<String, Double>> parseShadows(JsonObject root) {
        Map<String, Map<String, Double>> out = new LinkedHashMap<>();
        for (Map.Entry<String, JsonElement> model : root.entrySet()) {
            JsonElement given = model.getValue().getAsJsonObject().get("shadows");
            if (given == null || !given.isJsonObject() || given.getAsJsonObject().size() == 0) {
                continue;
            }
            Map<String, Double> fractions = new LinkedHashMap<>();
            given.getAsJsonObject().entrySet().forEach(
                    f -> fractions.put(f.getKey(), f.getValue().getAsDouble()));
            out.put(model.getKey(), fractions);
        }
        return out;
    }

    /** Per model, the versions the state file records ({"versions": {V: {...}}, ...}). */
    static Map<String, Set<String>> recorded(JsonObject root) {
        Map<String, Set<String>> out = new HashMap<>();
        for (Map.Entry<String, JsonElement> model : root.entrySet()) {
            JsonElement known = model.getValue().getAsJsonObject().get("versions");
            out.put(model.getKey(), known != null && known.isJsonObject()
                    ? Set.copyOf(known.getAsJsonObject().keySet()) : Set.of());
        }
        return out;
    }
}
