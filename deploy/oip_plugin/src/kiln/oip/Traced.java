package kiln.oip;

import io.netty.handler.codec.http.HttpHeaders;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.pytorch.serve.util.messages.RequestInput;

/**
 * What follows one request from the front proxy to a worker and back: its id, trace context
 * and the time nginx read it go to the worker with the body (the handler's Server-Timing is
 * measured from that time); the handler's timing, version, batch size and the reason of a 4xx
 * come back on the answer, as TorchServe's /predictions passes them.
 */
final class Traced {
    // As deploy/nginx/nginx.conf sets them and kiln.handlers.timing reads them.
    static final List<String> TO_WORKER = List.of("X-Request-ID", "traceparent", "Kiln-Received");
    // As kiln.handlers.handler and kiln.handlers.timing set them.
    static final List<String> FROM_WORKER = List.of(OipRoutes.VERSION_HEADER, "Server-Timing",
            "Kiln-Batch-Size", "Kiln-Reason");

    private Traced() {
    }

    /** The request's TO_WORKER headers that it has. */
    static Map<String, String> of(HttpHeaders headers) {
        Map<String, String> found = new LinkedHashMap<>();
        for (String name : TO_WORKER) {
            String value = headers.get(name);
            if (value != null) {
                found.put(name, value);
            }
        }
        return found;
    }

    static RequestInput pass(Map<String, String> headers, RequestInput input) {
        headers.forEach(input::updateHeaders);
        return input;
    }

    /** The answer with the worker's FROM_WORKER headers (none: as it is). */
    static Reply back(Map<String, String> headers, Reply answer) {
        if (headers != null) {
            for (String name : FROM_WORKER) {
                String value = headers.get(name);
                if (value != null) {
                    answer.withHeader(name, value);
                }
            }
        }
        return answer;
    }
}
