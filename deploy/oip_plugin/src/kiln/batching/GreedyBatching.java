package kiln.batching;

import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.security.ProtectionDomain;
import java.util.Set;
import java.util.concurrent.LinkedBlockingDeque;
import java.util.concurrent.TimeUnit;
import jdk.internal.org.objectweb.asm.ClassReader;
import jdk.internal.org.objectweb.asm.ClassVisitor;
import jdk.internal.org.objectweb.asm.ClassWriter;
import jdk.internal.org.objectweb.asm.MethodVisitor;
import jdk.internal.org.objectweb.asm.Opcodes;

/**
 * Greedy batching for TorchServe 0.12's frontend, as a Java agent (vmargs -javaagent).
 *
 * <p>TorchServe's Model.pollBatch / pollInferJob take a batch's first job, then wait up to
 * maxBatchDelay for each further one. Two costs: a lone request always waits the whole delay;
 * and a job taken while that wait is interrupted (its worker died) is in no request yet, so
 * WorkerThread never answers it (the client waits for its own timeout).
 *
 * <p>Here a batch waits only while jobs keep coming: when no second job is queued as the first
 * is taken, the batch goes at once; when one is (there is load), the further jobs are waited
 * for as TorchServe does, so batches fill as before. A wait interrupted by the worker's death
 * ends the batch instead of throwing: the jobs taken go into the request, and WorkerThread
 * answers that request's jobs "Worker died." at its next interruptible step.
 *
 * <p>The rewrite is one call, the same size (invokevirtual to invokestatic with the deque as
 * first argument): no offset or stack frame changes. It uses the ASM copy inside the JDK
 * (java.base exports it with --add-exports, which Kiln's vmargs give).
 */
public final class GreedyBatching {
    static final String MODEL = "org/pytorch/serve/wlm/Model";
    static final Set<String> METHODS = Set.of("pollBatch", "pollInferJob");
    static final String DEQUE = "java/util/concurrent/LinkedBlockingDeque";
    static final String TIMED_POLL = "(JLjava/util/concurrent/TimeUnit;)Ljava/lang/Object;";
    static final String SELF = "kiln/batching/GreedyBatching";
    // Whether this worker thread's batch found a second job queued: it then waits as TorchServe.
    private static final ThreadLocal<Boolean> LOADED = ThreadLocal.withInitial(() -> false);

    private GreedyBatching() {}

    /** What the rewritten calls run. A wait for ever (a worker with no job yet) stays one and
     * starts a batch; a shorter one (the batch delay) takes what is queued when the batch has
     * found no second job, and waits otherwise. */
    public static Object poll(LinkedBlockingDeque<?> queue, long timeout, TimeUnit unit)
            throws InterruptedException {
        if (timeout == Long.MAX_VALUE) {
            LOADED.set(false);
            return queue.poll(timeout, unit);
        }
        if (!LOADED.get()) {
            Object next = queue.poll();
            LOADED.set(next != null);
            return next;
        }
        try {
            return queue.poll(timeout, unit);
        } catch (InterruptedException died) {
            Thread.currentThread().interrupt();
            return null;
        }
    }

    public static void premain(String args, Instrumentation inst) {
        inst.addTransformer(new Transformer());
    }

    static final class Transformer implements ClassFileTransformer {
        @Override
        public byte[] transform(ClassLoader loader, String name, Class<?> redefined,
                ProtectionDomain domain, byte[] bytes) {
            if (!MODEL.equals(name)) {
                return null;
            }
            ClassReader reader = new ClassReader(bytes);
            ClassWriter writer = new ClassWriter(reader, 0);
            Rewriter rewriter = new Rewriter(writer);
            reader.accept(rewriter, 0);
            if (rewriter.rewritten == 0) {
                // A TorchServe other than 0.12 polls some other way: batch as it does, loudly.
                System.err.println("kiln: greedy batching found no batch wait in " + name
                        + "; TorchServe's own batching is in effect");
                return null;
            }
            return writer.toByteArray();
        }
    }

    static final class Rewriter extends ClassVisitor {
        int rewritten;

        Rewriter(ClassVisitor next) {
            super(Opcodes.ASM8, next);
        }

        @Override
        public MethodVisitor visitMethod(int access, String method, String descriptor,
                String signature, String[] exceptions) {
            MethodVisitor next = super.visitMethod(access, method, descriptor, signature,
                    exceptions);
            if (!METHODS.contains(method)) {
                return next;
            }
            return new MethodVisitor(Opcodes.ASM8, next) {
                @Override
                public void visitMethodInsn(int opcode, String owner, String called,
                        String desc, boolean isInterface) {
                    if (opcode == Opcodes.INVOKEVIRTUAL && DEQUE.equals(owner)
                            && "poll".equals(called) && TIMED_POLL.equals(desc)) {
                        rewritten++;
                        super.visitMethodInsn(Opcodes.INVOKESTATIC, SELF, "poll",
                                "(L" + DEQUE + ";JLjava/util/concurrent/TimeUnit;)"
                                        + "Ljava/lang/Object;", false);
                    } else {
                        super.visitMethodInsn(opcode, owner, called, desc, isInterface);
                    }
                }
            };
        }
    }
}
