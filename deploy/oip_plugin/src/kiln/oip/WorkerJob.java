package kiln.oip;

import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.util.messages.WorkerCommands;

/**
 * One inference request queued to a model's workers as /predictions/NAME queues it, whose
 * answer is awaited here instead of being written to a Netty channel.
 */
final class WorkerJob extends Job {

    private final CompletableFuture<Reply> reply = new CompletableFuture<>();

    WorkerJob(String model, RequestInput input) {
        // A null version means the model's default version, as for /predictions/NAME.
        super(model, null, WorkerCommands.PREDICT, input);
    }

    @Override
    public void response(byte[] body, CharSequence contentType, int status, String phrase,
            Map<String, String> headers) {
        String type = contentType == null ? Reply.JSON : contentType.toString();
        reply.complete(new Reply(status, type, body));
    }

    @Override
    public void sendError(int status, String error) {
        reply.complete(Reply.error(status, error));
    }

    @Override
    public boolean isOpen() {
        // The waiting thread is the "client": it listens until it gets an answer.
        return !reply.isDone();
    }

    Reply await(long timeoutSeconds) throws InterruptedException {
        try {
            return reply.get(timeoutSeconds, TimeUnit.SECONDS);
        } catch (TimeoutException e) {
            return Reply.error(504, "the model did not answer within " + timeoutSeconds + " s");
        } catch (ExecutionException e) {
            return Reply.error(500, "the model failed");
        }
    }
}
