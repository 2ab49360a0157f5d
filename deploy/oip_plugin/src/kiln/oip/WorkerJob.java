package kiln.oip;

import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.util.messages.WorkerCommands;

/**
 * One inference request queued to a model's workers as /predictions/NAME queues it, whose
 * answer completes a future instead of being written to TorchServe's own Netty channel.
 */
final class WorkerJob extends Job {

    private final CompletableFuture<Reply> reply = new CompletableFuture<>();

    WorkerJob(String model, String version, RequestInput input) {
        // A null version means the model's default version, as for /predictions/NAME.
        super(model, version, WorkerCommands.PREDICT, input);
    }

    @Override
    public void response(byte[] body, CharSequence contentType, int status, String phrase,
            Map<String, String> headers) {
        String type = contentType == null ? Reply.JSON : contentType.toString();
        reply.complete(Traced.back(headers, new Reply(status, type, body)));
    }

    @Override
    public void sendError(int status, String error) {
        reply.complete(Reply.error(status, error));
    }

    @Override
    public boolean isOpen() {
        // Someone listens until the answer came or the wait timed out.
        return !reply.isDone();
    }

    /**
     * The model's answer, or a 504 after timeoutSeconds. It completes on a TorchServe worker
     * thread or on the JDK's timer thread, never by blocking the caller.
     */
    CompletableFuture<Reply> reply(long timeoutSeconds) {
        return reply.orTimeout(timeoutSeconds, TimeUnit.SECONDS).exceptionally(e -> {
            Throwable cause = e instanceof CompletionException ? e.getCause() : e;
            return cause instanceof TimeoutException
                    ? Reply.error(504, "the model did not answer within " + timeoutSeconds + " s")
                    : Reply.error(500, "the model failed");
        });
    }
}
