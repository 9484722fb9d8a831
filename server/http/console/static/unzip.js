// Reads the files of an audit bundle (a zip written by civicdp.audit.bundle.write_bundle, with
// ZIP64 records) in the browser: the central directory, then each file inflated with the
// browser's own DecompressionStream. window.civicdpUnzip(arrayBuffer) -> Map(name -> Uint8Array).
"use strict";
(function () {
  const MAX32 = 0xffffffff;

  function u16(view, at) { return view.getUint16(at, true); }
  function u32(view, at) { return view.getUint32(at, true); }
  function u64(view, at) { return Number(view.getBigUint64(at, true)); }

  function directory(view) {
    // End of central directory: the last signature 0x06054b50 (a comment may follow it).
    let end = -1;
    for (let at = view.byteLength - 22; at >= Math.max(0, view.byteLength - 65557); at--) {
      if (u32(view, at) === 0x06054b50) { end = at; break; }
    }
    if (end < 0) throw new Error("not a zip file (no end of central directory)");
    let count = u16(view, end + 10), offset = u32(view, end + 16);
    if (offset === MAX32 || count === 0xffff) {
      const locator = end - 20;
      if (u32(view, locator) !== 0x07064b50) throw new Error("a damaged ZIP64 zip file");
      const record = u64(view, locator + 8);
      if (u32(view, record) !== 0x06064b50) throw new Error("a damaged ZIP64 zip file");
      count = u64(view, record + 32);
      offset = u64(view, record + 48);
    }
    return { count, offset };
  }

  function zip64Sizes(view, at, length, sizes) {
    // The ZIP64 extra field (0x0001) holds, in order, the values stored as 0xFFFFFFFF.
    for (let pos = at; pos + 4 <= at + length;) {
      const id = u16(view, pos), size = u16(view, pos + 2);
      if (id === 1) {
        let field = pos + 4;
        for (const name of ["uncompressed", "compressed", "offset"]) {
          if (sizes[name] === MAX32) { sizes[name] = u64(view, field); field += 8; }
        }
      }
      pos += 4 + size;
    }
    return sizes;
  }

  async function inflate(bytes) {
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  window.civicdpUnzip = async function (buffer) {
    const view = new DataView(buffer);
    const { count, offset } = directory(view);
    const files = new Map();
    const decoder = new TextDecoder();
    for (let i = 0, at = offset; i < count; i++) {
      if (u32(view, at) !== 0x02014b50) throw new Error("a damaged zip central directory");
      const method = u16(view, at + 10);
      const nameLength = u16(view, at + 28), extraLength = u16(view, at + 30), commentLength = u16(view, at + 32);
      const name = decoder.decode(new Uint8Array(buffer, at + 46, nameLength));
      const sizes = zip64Sizes(view, at + 46 + nameLength, extraLength,
                               { compressed: u32(view, at + 20), uncompressed: u32(view, at + 24), offset: u32(view, at + 42) });
      const local = sizes.offset;
      if (u32(view, local) !== 0x04034b50) throw new Error(`a damaged zip entry: ${name}`);
      const start = local + 30 + u16(view, local + 26) + u16(view, local + 28);
      const raw = new Uint8Array(buffer, start, sizes.compressed);
      if (method === 0) files.set(name, raw);
      else if (method === 8) files.set(name, await inflate(raw));
      else throw new Error(`unsupported compression in ${name}`);
      at += 46 + nameLength + extraLength + commentLength;
    }
    return files;
  };
})();
