// Attached images -> data: URIs for the request, resized in the browser to the model's largest side.
//
// The model never sees more than `maxSide` pixels on the longest side (mistral-common scales larger
// images down to it), so sending more only makes uploads slow and the server's pixel limit easy to
// hit. An image already within the size is sent byte for byte, so the model sees exactly its pixels.

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

export function isImage(file) {
  return file && typeof file.type === "string" && file.type.startsWith("image/");
}

// A File -> {name, dataUrl, width, height, resized, from: [w, h]}.
export async function prepareImage(file, maxSide, resize) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    // A format this browser cannot decode: send it as it is and let the server say what it thinks.
    return {name: file.name, dataUrl: await readAsDataUrl(file), width: null, height: null, resized: false};
  }
  const {width, height} = bitmap;
  const longest = Math.max(width, height);
  if (!resize || !maxSide || longest <= maxSide) {
    bitmap.close();
    return {name: file.name, dataUrl: await readAsDataUrl(file), width, height, resized: false};
  }
  const scale = maxSide / longest;
  const w = Math.max(1, Math.round(width * scale));
  const h = Math.max(1, Math.round(height * scale));
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, 0, 0, w, h);
  bitmap.close();
  // Photos stay JPEG (small); anything else becomes PNG (lossless: charts, text, screenshots).
  const type = file.type === "image/jpeg" ? "image/jpeg" : "image/png";
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, type, 0.92));
  return {name: file.name, dataUrl: await readAsDataUrl(blob), width: w, height: h, resized: true,
          from: [width, height]};
}
