// Calls to the service's /v1 API. A bearer token, when the service asks for one, is kept in
// localStorage and sent with every call (and as ?access_token= on the event stream).
const TOKEN_KEY = "vaewatch.token";

export function token() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders() {
  const value = token();
  return value ? { Authorization: `Bearer ${value}` } : {};
}

export class ApiError extends Error {}

export async function call(path, { method = "GET", json, body } = {}) {
  const headers = authHeaders();
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body });
  if (response.status === 401) {
    const given = window.prompt("This service needs a bearer token:");
    if (given) {
      localStorage.setItem(TOKEN_KEY, given);
      return call(path, { method, json, body: json === undefined ? body : undefined });
    }
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const message = data && data.error ? data.error.message : response.statusText;
    throw new ApiError(`${response.status}: ${message}`);
  }
  return data;
}

export function pngSource(b64) {
  return `data:image/png;base64,${b64}`;
}

// A PNG file -> 784 grey pixel values (0..255), read through a canvas.
export async function filePixels(file) {
  const bitmap = await createImageBitmap(file);
  if (bitmap.width !== 28 || bitmap.height !== 28) {
    throw new ApiError(`${file.name}: ${bitmap.width}x${bitmap.height}, expected 28x28`);
  }
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 28;
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, 28, 28).data;
  const pixels = [];
  for (let i = 0; i < rgba.length; i += 4) {
    // ITU-R 601 luma, as PIL's convert("L") does on the server.
    pixels.push(Math.round((rgba[i] * 299 + rgba[i + 1] * 587 + rgba[i + 2] * 114) / 1000));
  }
  return pixels;
}

export function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function figure(src, caption, className) {
  return element("figure", {}, element("img", { src, alt: caption, class: `pixelated ${className}` }), caption);
}

export function details(rows) {
  const list = element("dl");
  for (const [term, value] of rows) list.append(element("dt", {}, term), element("dd", {}, value));
  return list;
}
