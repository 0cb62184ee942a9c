package org.edgecomp;

import android.content.Context;
import android.content.res.AssetManager;
import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;

/**
 * An edgecomp model in an Android app: load once, run many times.
 *
 * <pre>
 *   EdgecompModel model = EdgecompModel.fromAssets(context, "model", 4);
 *   float[] scores = model.run(pixels);   // the model's first input, C order, float32
 *   model.close();
 * </pre>
 *
 * The model folder (model.so, manifest.json [, weights.params]) and runtime.json are packed as
 * assets by build.sh and copied to the app's files folder on first use, because TVM loads
 * model.so with dlopen, which needs a real file.
 */
public final class EdgecompModel implements AutoCloseable {
  static {
    System.loadLibrary("c++_shared");
    System.loadLibrary("tvm_ffi");
    System.loadLibrary("tvm_runtime");
    System.loadLibrary("edgecomp_jni");
  }

  private long handle;

  private EdgecompModel(long handle) {
    this.handle = handle;
  }

  /** Load a model folder from the file system; threads 0 = one per core. */
  public static EdgecompModel load(String dir, int threads, String runtimeRecord) {
    return new EdgecompModel(nativeLoad(dir, threads, runtimeRecord));
  }

  /** Copy assets/NAME/ (and assets/runtime.json) to the files folder, then load it. */
  public static EdgecompModel fromAssets(Context context, String name, int threads)
      throws IOException {
    AssetManager assets = context.getAssets();
    File dir = new File(context.getFilesDir(), name);
    dir.mkdirs();
    for (String file : assets.list(name)) {
      copy(assets.open(name + "/" + file), new File(dir, file));
    }
    File record = new File(context.getFilesDir(), "runtime.json");
    copy(assets.open("runtime.json"), record);
    return load(dir.getAbsolutePath(), threads, record.getAbsolutePath());
  }

  /** Run once on the model's first input (float32, C order); returns its first output. */
  public float[] run(float[] input) {
    if (handle == 0) throw new IllegalStateException("the model is closed");
    return nativeRun(handle, input);
  }

  @Override
  public void close() {
    if (handle != 0) {
      nativeFree(handle);
      handle = 0;
    }
  }

  private static void copy(InputStream in, File to) throws IOException {
    try (InputStream src = in; OutputStream out = new FileOutputStream(to)) {
      byte[] buffer = new byte[1 << 16];
      int n;
      while ((n = src.read(buffer)) > 0) out.write(buffer, 0, n);
    }
  }

  private static native long nativeLoad(String dir, int threads, String runtimeRecord);

  private static native float[] nativeRun(long handle, float[] input);

  private static native void nativeFree(long handle);
}
