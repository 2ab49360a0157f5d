package kiln.oip;

/**
 * What requests may cost the plugin: the handler's bounds on one request
 * (kiln.handlers.limits, passed as JVM properties by Kiln's server start-up, so that they are
 * written once), checked from a binary request's JSON header; and the bytes of request bodies
 * the plugin holds at once, over every connection.
 */
final class RequestLimits {
    static final String MAX_INSTANCES = "kiln.oip.max_instances";
    static final String MAX_VALUES = "kiln.oip.max_request_values";
    static final String MAX_BYTES_IN_FLIGHT = "kiln.oip.max_bytes_in_flight";
    // The JVM holds a body about three times while it is in flight: Netty's aggregate, the
    // copy queued to the model, and the frame TorchServe writes to the worker. A sixteenth of
    // the heap in bodies (64 MiB of the 1 GiB Kiln gives it: sixteen bodies at the 4 MiB
    // max_request_size, or 40 of lenet's largest legal binary request) keeps that under a
    // fifth of the heap; 8 clients flooding with 4 MiB bodies had taken it past all of it.
    private static final int HEAP_FRACTION = 16;

    final int maxInstances;
    final int maxValues;
    final long maxBytesInFlight;

    private RequestLimits(int maxInstances, int maxValues, long maxBytesInFlight) {
        this.maxInstances = maxInstances;
        this.maxValues = maxValues;
        this.maxBytesInFlight = maxBytesInFlight;
    }

    /** Without a property, no bound of the handler's here (the handler still checks it). */
    static RequestLimits fromProperties() {
        long heapShare = Runtime.getRuntime().maxMemory() / HEAP_FRACTION;
        return new RequestLimits(
                ConnectionGuard.Limits.positive(MAX_INSTANCES, Integer.MAX_VALUE),
                ConnectionGuard.Limits.positive(MAX_VALUES, Integer.MAX_VALUE),
                ConnectionGuard.Limits.positive(MAX_BYTES_IN_FLIGHT, (int) Math.min(heapShare,
                        Integer.MAX_VALUE)));
    }
}
