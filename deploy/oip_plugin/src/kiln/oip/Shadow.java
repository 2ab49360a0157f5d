package kiln.oip;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.prometheus.client.Counter;
import io.prometheus.client.Gauge;
import io.prometheus.client.Histogram;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.Supplier;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * Shadow scoring (issue 18, `kiln shadow NAME V --fraction F`): a candidate version also scores
 * a sample of the requests routed to another version (the primary). The two answers are
 * compared here, once both are in, and the candidate's is dropped: a client only ever gets the
 * primary's, and never waits for the candidate's (its future is the primary's alone).
 *
 * The figures are Prometheus metrics in TorchServe's default registry, which TorchServe's own
 * metrics page writes out whole, so they reach the front proxy's metrics port with no exporter
 * of their own. Labels: the model and the candidate's version (and, for the latency, which of
 * the pair it is).
 */
final class Shadow {

    /** As kiln.handlers.oip.LABEL_OUTPUT: the OIP answer's predicted labels, one per row. */
    private static final String LABEL_OUTPUT = "label";
    /**
     * Pairs in flight per (model, candidate) beyond which a sample is dropped (and counted): a
     * slow or stuck candidate then holds at most this many places in its own queue and this
     * many answers in memory, whatever the traffic, and its primary's queue gets at most this
     * many recomputed requests (REST) ahead of the clients'.
     */
    static final int MAX_IN_FLIGHT = 8;
    private static final double[] LATENCY_BUCKETS_S = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
        0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
    private static final Logger LOG = LoggerFactory.getLogger(Shadow.class);

    // Registered once per JVM, when the class loads (TorchServe builds its plugins twice).
    static final Counter REQUESTS = Counter.build().name("kiln_shadow_requests_total")
            .help("Requests sampled for a shadow version, by outcome: scored (both answered "
                    + "2xx), candidate_error, primary_error, unlike (answers of another shape), "
                    + "dropped (too many in flight)")
            .labelNames("model_name", "version", "outcome").register();
    static final Counter ROWS = Counter.build().name("kiln_shadow_rows_total")
            .help("Answer rows compared by their predicted label (multiclass, binary, multilabel)")
            .labelNames("model_name", "version").register();
    static final Counter AGREED = Counter.build().name("kiln_shadow_agreed_rows_total")
            .help("Compared rows whose predicted label (multilabel: label set) is the primary's")
            .labelNames("model_name", "version").register();
    static final Counter VALUES = Counter.build().name("kiln_shadow_values_total")
            .help("Output values compared by absolute difference (regression, raw)")
            .labelNames("model_name", "version").register();
    static final Counter DIFF_SUM = Counter.build().name("kiln_shadow_abs_diff_sum_total")
            .help("Sum of the absolute differences of the compared values (mean: over "
                    + "kiln_shadow_values_total)")
            .labelNames("model_name", "version").register();
    static final Gauge DIFF_MAX = Gauge.build().name("kiln_shadow_abs_diff_max")
            .help("Largest absolute difference of a compared value since the server started")
            .labelNames("model_name", "version").register();
    static final Histogram LATENCY = Histogram.build().name("kiln_shadow_latency_seconds")
            .help("Latency of the pair's answers, from queueing to the answer: role primary "
                    + "(the routed version) or candidate (the shadow `version`)")
            .labelNames("model_name", "version", "role").buckets(LATENCY_BUCKETS_S).register();

    /** An answer and how long it took. */
    static final class Timed {
        final Reply reply;
        final double seconds;

        Timed(Reply reply, double seconds) {
            this.reply = reply;
            this.seconds = seconds;
        }
    }

    // Comparing parses both answers: off TorchServe's worker threads and the event loops, so
    // that no client's answer waits behind it. One thread: the work is small and bounded.
    private final ExecutorService comparing = Executors.newSingleThreadExecutor(run -> {
        Thread thread = new Thread(run, "kiln-shadow");
        thread.setDaemon(true);
        return thread;
    });
    private final Map<String, AtomicInteger> inFlight = new ConcurrentHashMap<>();

    /** The answer of `run`, timed from now. */
    static CompletableFuture<Timed> time(Supplier<CompletableFuture<Reply>> run) {
        long start = System.nanoTime();
        return run.get().thenApply(reply -> new Timed(reply, (System.nanoTime() - start) / 1e9));
    }

    /**
     * Scores `candidate` against `primary` once both are in, unless MAX_IN_FLIGHT pairs of
     * this (model, candidate) are: then neither supplier is called. Returns at once.
     */
    void score(String model, String candidate, Supplier<CompletableFuture<Timed>> primary,
            Supplier<CompletableFuture<Timed>> shadow) {
        AtomicInteger count = inFlight.computeIfAbsent(model + "\0" + candidate,
                k -> new AtomicInteger());
        if (count.incrementAndGet() > MAX_IN_FLIGHT) {
            count.decrementAndGet();
            REQUESTS.labels(model, candidate, "dropped").inc();
            return;
        }
        primary.get().thenAcceptBothAsync(shadow.get(),
                (p, c) -> compare(model, candidate, p, c), comparing)
                .whenComplete((done, error) -> {
                    count.decrementAndGet();
                    if (error != null) {
                        LOG.warn("shadow scoring of {} {} failed", model, candidate, error);
                    }
                });
    }

    static void compare(String model, String candidate, Timed primary, Timed shadow) {
        if (!ok(primary.reply)) {  // nothing to compare with
            REQUESTS.labels(model, candidate, "primary_error").inc();
            return;
        }
        LATENCY.labels(model, candidate, "primary").observe(primary.seconds);
        if (!ok(shadow.reply)) {
            REQUESTS.labels(model, candidate, "candidate_error").inc();
            return;
        }
        LATENCY.labels(model, candidate, "candidate").observe(shadow.seconds);
        Answer a = Answer.read(primary.reply.body);
        Answer b = Answer.read(shadow.reply.body);
        boolean alike = a.labels.isEmpty() ? b.labels.isEmpty() && !a.values.isEmpty()
                && a.values.size() == b.values.size() : a.labels.size() == b.labels.size();
        if (!alike) {
            REQUESTS.labels(model, candidate, "unlike").inc();
            return;
        }
        if (a.labels.isEmpty()) {
            differences(model, candidate, a.values, b.values);
        } else {
            int agreed = 0;
            for (int i = 0; i < a.labels.size(); i++) {
                agreed += a.labels.get(i).equals(b.labels.get(i)) ? 1 : 0;
            }
            ROWS.labels(model, candidate).inc(a.labels.size());
            AGREED.labels(model, candidate).inc(agreed);
        }
        // Counted last: a reader that sees the request scored sees its figures too.
        REQUESTS.labels(model, candidate, "scored").inc();
    }

    private static void differences(String model, String candidate, List<Double> a,
            List<Double> b) {
        double sum = 0;
        double max = 0;
        for (int i = 0; i < a.size(); i++) {
            double diff = Math.abs(a.get(i) - b.get(i));
            sum += diff;
            max = Math.max(max, diff);
        }
        VALUES.labels(model, candidate).inc(a.size());
        DIFF_SUM.labels(model, candidate).inc(sum);
        Gauge.Child top = DIFF_MAX.labels(model, candidate);
        if (max > top.get()) {
            top.set(max);  // one comparing thread: no lost update
        }
    }

    private static boolean ok(Reply reply) {
        return reply.status / 100 == 2;
    }

    /**
     * What an answer said, row by row: its predicted labels, or else its output values. Read
     * from Kiln's REST answers (one object per instance, or a list of them: "label", "labels",
     * "values" or "output", kiln.handlers.answers) and OIP answers ("outputs" tensors).
     */
    static final class Answer {
        final List<String> labels = new ArrayList<>();
        final List<Double> values = new ArrayList<>();

        static Answer read(byte[] body) {
            Answer out = new Answer();
            JsonElement root;
            try {
                root = JsonParser.parseString(new String(body, StandardCharsets.UTF_8));
            } catch (RuntimeException e) {
                return out;  // not JSON: nothing to compare ("unlike")
            }
            if (root.isJsonObject() && root.getAsJsonObject().has("outputs")) {
                out.oip(root.getAsJsonObject().getAsJsonArray("outputs"));
            } else if (root.isJsonArray()) {
                root.getAsJsonArray().forEach(out::rest);
            } else {
                out.rest(root);
            }
            return out;
        }

        private void oip(JsonArray outputs) {
            for (JsonElement tensor : outputs) {
                JsonObject t = tensor.getAsJsonObject();
                if (t.get("name").getAsString().equals(LABEL_OUTPUT)) {
                    t.getAsJsonArray("data").forEach(label -> labels.add(label.getAsString()));
                } else if (!t.get("datatype").getAsString().equals("BYTES")) {
                    numbers(t.get("data"));
                }
            }
        }

        private void rest(JsonElement answer) {
            if (!answer.isJsonObject()) {
                return;
            }
            JsonObject a = answer.getAsJsonObject();
            if (a.has("label")) {
                labels.add(a.get("label").getAsString());
            } else if (a.has("labels")) {
                labels.add(a.get("labels").toString());  // a multilabel row: its label set
            } else if (a.has("values")) {
                a.getAsJsonObject("values").entrySet().forEach(v -> numbers(v.getValue()));
            } else if (a.has("output")) {
                numbers(a.get("output"));
            }
        }

        private void numbers(JsonElement data) {
            if (data.isJsonArray()) {
                data.getAsJsonArray().forEach(this::numbers);
            } else if (data.isJsonPrimitive() && data.getAsJsonPrimitive().isNumber()) {
                values.add(data.getAsDouble());
            }
        }
    }
}
