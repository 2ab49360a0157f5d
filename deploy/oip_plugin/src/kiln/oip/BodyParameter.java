package kiln.oip;

import org.pytorch.serve.util.messages.InputParameter;

/**
 * A request's body as the one parameter, "body", queued to a model's workers, held as it is
 * given. InputParameter's own constructor clones its byte[]: under a flood of 4 MB bodies
 * that clone was half of what the plugin allocated (measured with JFR). TorchServe reads a
 * parameter only through these getters (ModelRequestEncoder writes the worker's frame from
 * them).
 */
final class BodyParameter extends InputParameter {
    private static final String NAME = "body";

    private final byte[] value;
    private final String contentType;

    /** value: owned by this parameter from now on (never changed by TorchServe). */
    BodyParameter(byte[] value, String contentType) {
        this.value = value;
        this.contentType = contentType;
    }

    @Override
    public String getName() {
        return NAME;
    }

    @Override
    public byte[] getValue() {
        return value;
    }

    @Override
    public CharSequence getContentType() {
        return contentType;
    }
}
