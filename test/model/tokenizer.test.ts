/**
 * Tokenizer and chat template of models/tiny-llama (Llama-3.2-Instruct's real tokenizer
 * files) against the ids that scripts/make-fixtures.py wrote with Python transformers.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { FormatError } from '../../src/formats/errors';
import { openModelDir } from '../../src/model/node-source';
import { DroppedFilesSource } from '../../src/model/source';
import { TOKENIZER_PROBE, loadTokenizer, type ChatMessage, type ChatTokenizer } from '../../src/model/tokenizer';
import { ROOT, TINY_DIR, memorySource } from '../helpers/model-files';

interface ChatFixture {
  ids: number[];
  text: string;
  messages: ChatMessage[];
  date_string: string;
}

describe('loadTokenizer on models/tiny-llama', () => {
  let tok: ChatTokenizer;
  let chat: ChatFixture;
  beforeAll(async () => {
    const fixture = JSON.parse(await readFile(join(ROOT, 'test', 'fixtures', 'tiny-llama.json'), 'utf8')) as { sequences: (ChatFixture & { name: string })[] };
    chat = fixture.sequences.find((s) => s.name === 'chat')!;
    tok = await loadTokenizer(await openModelDir(TINY_DIR));
  });

  it('renders and encodes the chat exactly as Python transformers did', () => {
    const opts = { addGenerationPrompt: true, dateString: chat.date_string };
    expect(tok.renderChat(chat.messages, opts)).toBe(chat.text);
    expect(tok.applyChatTemplate(chat.messages, opts)).toEqual(chat.ids);
    // One <|begin_of_text|>, from the template, not a second from the post-processor.
    expect(tok.applyChatTemplate(chat.messages, opts).filter((id) => id === 128000)).toHaveLength(1);
  });

  it('reads special token ids from the model files', () => {
    expect(tok.eosTokenIds).toEqual([128001, 128008, 128009]);
    expect(tok.bosTokenId).toBe(128000);
    expect(tok.tokenId('<|eot_id|>')).toBe(128009);
    expect(tok.tokenId('<|start_header_id|>')).toBe(128006);
    expect(tok.tokenId('no such token')).toBeNull();
    expect(tok.hasChatTemplate).toBe(true);
  });

  it('encodes with and without the BOS the post-processor adds', () => {
    const plain = tok.encode('What is 7 times 6?', { addSpecialTokens: false });
    // The user turn of the fixture's chat holds exactly these ids.
    expect(plain).toEqual(chat.ids.slice(30, 38));
    expect(tok.encode('What is 7 times 6?')).toEqual([128000, ...plain]);
  });

  it('decodes back to the text (round trip), with or without special tokens', () => {
    expect(tok.decode(chat.ids)).toBe(chat.text);
    const stripped = chat.text.replace(/<\|[a-z_]+\|>/g, '');
    expect(tok.decode(chat.ids, { skipSpecialTokens: true })).toBe(stripped);
    for (const text of ['Hello, world!', ' leading space and  double', 'ünïcödé ✓ 数字 123', 'line\nbreak\ttab']) {
      expect(tok.decode(tok.encode(text, { addSpecialTokens: false }))).toBe(text);
    }
    expect(tok.decode([])).toBe('');
  });

  it('loads from dropped files the same as from the folder', async () => {
    const names = ['tokenizer.json', 'tokenizer_config.json', 'config.json', 'generation_config.json'];
    const files = await Promise.all(names.map(async (n) => new File([await readFile(join(TINY_DIR, n))], n)));
    const dropped = await loadTokenizer(new DroppedFilesSource(files));
    expect(dropped.applyChatTemplate(chat.messages, { dateString: chat.date_string })).toEqual(chat.ids);
    expect(dropped.eosTokenIds).toEqual(tok.eosTokenIds);
  });

  it('names the file when the tokenizer is missing or not a tokenizer', async () => {
    const missing = memorySource({ 'config.json': '{}' });
    await expect(loadTokenizer(missing)).rejects.toThrow(/tokenizer\.json/);
    const bad = memorySource({ 'tokenizer.json': '{"version": "1.0"}' });
    const e = await loadTokenizer(bad).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(FormatError);
    expect((e as Error).message).toMatch(/^tokenizer\.json: is not a tokenizers JSON file/);
  });
});

type Json = Record<string, unknown>;
const readJson = async (dir: string, name: string): Promise<Json> => JSON.parse(await readFile(join(dir, name), 'utf8')) as Json;
const MICRO_DIR = join(ROOT, 'models', 'micro-arith');

/** A source holding the given tokenizer files and a config.json of the given vocabulary size. */
const tokenizerSource = (tokenizer: Json, tokenizerConfig: Json, vocabSize: number) =>
  memorySource({ 'tokenizer.json': JSON.stringify(tokenizer), 'tokenizer_config.json': JSON.stringify(tokenizerConfig), 'config.json': JSON.stringify({ vocab_size: vocabSize }) });

const refusal = async (p: Promise<unknown>): Promise<string> => {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(FormatError);
  return (e as Error).message;
};

/**
 * A SentencePiece-style tokenizer as Llama 2 and TinyLlama ship it (BPE with byte
 * fallback, a normalizer that prepends and substitutes "▁", a decoder that undoes it),
 * over printable ASCII: everything else goes through the <0x..> byte tokens.
 */
function sentencePieceTokenizer(): Json {
  const vocab: Record<string, number> = { '<unk>': 0, '<s>': 1, '</s>': 2 };
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`] = 3 + b;
  vocab['▁'] = 259;
  for (let c = 0x21; c <= 0x7e; c++) vocab[String.fromCharCode(c)] = 260 + c - 0x21;
  const special = (id: number, content: string) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
  return {
    version: '1.0',
    added_tokens: [special(0, '<unk>'), special(1, '<s>'), special(2, '</s>')],
    normalizer: { type: 'Sequence', normalizers: [{ type: 'Prepend', prepend: '▁' }, { type: 'Replace', pattern: { String: ' ' }, content: '▁' }] },
    pre_tokenizer: null,
    post_processor: null,
    decoder: {
      type: 'Sequence',
      decoders: [{ type: 'Replace', pattern: { String: '▁' }, content: ' ' }, { type: 'ByteFallback' }, { type: 'Fuse' }, { type: 'Strip', content: ' ', start: 1, stop: 0 }],
    },
    model: { type: 'BPE', dropout: null, unk_token: '<unk>', continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: true, byte_fallback: true, vocab, merges: [] },
  };
}

describe('loadTokenizer checks at load', () => {
  let micro: Json;
  let microConfig: Json;
  let tinyTokenizer: Json;
  let tinyConfig: Json;
  beforeAll(async () => {
    micro = await readJson(MICRO_DIR, 'tokenizer.json');
    microConfig = await readJson(MICRO_DIR, 'tokenizer_config.json');
    tinyTokenizer = await readJson(TINY_DIR, 'tokenizer.json');
    tinyConfig = await readJson(TINY_DIR, 'tokenizer_config.json');
  });
  const microWith = (model: Json, rest: Json = {}): Json => ({ ...micro, ...rest, model: { ...(micro.model as Json), ...model } });

  it('the probe text starts with a printable-ASCII line and holds other characters', () => {
    const [first, ...rest] = TOKENIZER_PROBE.split('\n');
    expect(first).toMatch(/^[\x20-\x7e]+$/);
    expect(rest.join('\n')).toMatch(/\t/);
    expect(rest.join('\n')).toMatch(/[^\x00-\x7f]/);
  });

  it('loads the char-level micro tokenizer, whose unknown characters come back as <unk>', async () => {
    const tok = await loadTokenizer(await openModelDir(MICRO_DIR));
    expect(tok.decode(tok.encode('12+34=46', { addSpecialTokens: false }))).toBe('12+34=46');
    // What "lossless" allows: outside its printable-ASCII alphabet the tokenizer says <unk>.
    expect(tok.encode('a\nb', { addSpecialTokens: false })).toEqual([tok.tokenId('a'), tok.tokenId('<unk>'), tok.tokenId('b')]);
  });

  it('loads a SentencePiece-style tokenizer (normalizer, byte fallback) and one that lowercases', async () => {
    const sp = await loadTokenizer(tokenizerSource(sentencePieceTokenizer(), { tokenizer_class: 'LlamaTokenizerFast', bos_token: '<s>', eos_token: '</s>', unk_token: '<unk>' }, 354));
    expect(sp.decode(sp.encode(TOKENIZER_PROBE, { addSpecialTokens: false }))).toBe(TOKENIZER_PROBE);
    // The normalizer's "▁", then the two UTF-8 bytes of "é" as byte tokens.
    expect(sp.encode('é', { addSpecialTokens: false })).toEqual([259, 3 + 0xc3, 3 + 0xa9]);
    // A Lowercase normalizer maps "Probe" and "probe" to the same text: not a loss.
    const lower = await loadTokenizer(tokenizerSource({ ...micro, normalizer: { type: 'Lowercase' } }, microConfig, 100));
    expect(lower.decode(lower.encode('AbC', { addSpecialTokens: false }))).toBe('abc');
  });

  it('refuses a model type the tokenizer library does not implement, naming tokenizer.json', async () => {
    expect(await refusal(loadTokenizer(tokenizerSource(microWith({ type: 'WordLevel' }), microConfig, 100)))).toBe(
      'tokenizer.json, model.type: is "WordLevel"; the tokenizer library implements BPE, WordPiece, Unigram models only. ' +
        'Use the tokenizer.json the model ships, unmodified.',
    );
    const untyped = microWith({});
    delete (untyped.model as Json).type;
    expect(await refusal(loadTokenizer(tokenizerSource(untyped, microConfig, 100)))).toMatch(/^tokenizer\.json, model\.type: is missing; /);
  });

  it('refuses a vocabulary of the wrong kind and merges that are not a list', async () => {
    expect(await refusal(loadTokenizer(tokenizerSource(microWith({ vocab: 5 }), microConfig, 100)))).toMatch(
      /^tokenizer\.json, model\.vocab: is 5, but a BPE vocabulary is an object mapping each token to its id\. /,
    );
    expect(await refusal(loadTokenizer(tokenizerSource(microWith({ vocab: ['a', 'b'] }), microConfig, 100)))).toContain('tokenizer.json, model.vocab: is ["a","b"], but a BPE vocabulary');
    expect(await refusal(loadTokenizer(tokenizerSource(microWith({ vocab: { a: 0, b: 'one' } }), microConfig, 100)))).toContain('tokenizer.json, model.vocab: gives "b" the id "one"');
    expect(await refusal(loadTokenizer(tokenizerSource(microWith({ merges: 3 }), microConfig, 100)))).toContain('tokenizer.json, model.merges: is 3, expected a list');
    expect(await refusal(loadTokenizer(tokenizerSource(microWith({ type: 'Unigram', vocab: { a: 0 } }), microConfig, 100)))).toContain(
      'tokenizer.json, model.vocab: is {"a":0}, but a Unigram vocabulary is a list of [token, score] pairs',
    );
  });

  it('refuses ids at or past the model vocabulary: added tokens, vocabulary entries, a smaller model', async () => {
    const added = [...(tinyTokenizer.added_tokens as Json[]), { id: 128256, content: '<|extra|>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }];
    expect(await refusal(loadTokenizer(tokenizerSource({ ...tinyTokenizer, added_tokens: added }, tinyConfig, 128256)))).toBe(
      'tokenizer.json, added_tokens: gives "<|extra|>" the id 128256, but the model\'s vocabulary has 128256 rows (vocab_size), so it has no embedding for that token. ' +
        'Use the tokenizer files that come with these weights: tokenizer.json and config.json must be from the same model.',
    );
    // The size the caller passes (the loaded model's) wins over config.json; the micro vocabulary needs 100 rows.
    const microSource = tokenizerSource(micro, microConfig, 100);
    expect(await refusal(loadTokenizer(microSource, 99))).toContain('tokenizer.json, model.vocab: gives "~" the id 99, but the model\'s vocabulary has 99 rows');
    expect(await refusal(loadTokenizer(tokenizerSource(micro, microConfig, 64)))).toContain('the id 64, but the model\'s vocabulary has 64 rows');
    // With no model at all, an id past any vocabulary is still refused (the library would build an array that long).
    const noModel = memorySource({ 'tokenizer.json': JSON.stringify(microWith({ vocab: { ...(micro.model as { vocab: Json }).vocab, huge: 1e9 } })) });
    expect(await refusal(loadTokenizer(noModel))).toContain('tokenizer.json, model.vocab: gives "huge" the id 1000000000, past any model\'s vocabulary (at most 1048576 ids)');
  });

  it('refuses a tokenizer that encodes to nothing or does not decode what it encodes', async () => {
    const empty = { ...micro, added_tokens: [], model: { ...(micro.model as Json), vocab: {}, unk_token: null } };
    expect(await refusal(loadTokenizer(tokenizerSource(empty, {}, 100)))).toBe(
      'tokenizer.json: encodes the probe text "Probe 1: 12+34 = 46, \\"x*y/z\\" (A-Z a-z)" to no ids. Use the tokenizer.json the model ships, unmodified.',
    );
    const swapped = { ...micro, decoder: { type: 'Sequence', decoders: [{ type: 'Replace', pattern: { String: 'x' }, content: 'y' }, { type: 'Fuse' }] } };
    expect(await refusal(loadTokenizer(tokenizerSource(swapped, microConfig, 100)))).toContain(
      'tokenizer.json: does not decode what it encodes: the probe text "Probe 1: 12+34 = 46, \\"x*y/z\\" (A-Z a-z)" comes back as "Probe 1: 12+34 = 46, \\"y*y/z\\" (A-Z a-z)"',
    );
    // Without an unknown token, characters outside the alphabet vanish silently: refused.
    const noUnk = microWith({ unk_token: null });
    expect(await refusal(loadTokenizer(tokenizerSource(noUnk, { ...microConfig, unk_token: null }, 100)))).toContain(
      'tokenizer.json: loses the character "\\n" (U+000A) without an unknown token: "a\\nb" comes back as "ab"',
    );
  });

  it('parses the chat template at load and refuses a broken one naming tokenizer_config.json', async () => {
    const withTemplate = (chat_template: unknown) => tokenizerSource(micro, { ...microConfig, chat_template }, 100);
    expect(await refusal(loadTokenizer(withTemplate('{{ bos_token }}{% for message in messages %}{{ message.content ')))).toBe(
      "tokenizer_config.json, chat_template: is not a valid Jinja template (Unexpected end of input). Use the model's original tokenizer_config.json, or fix the template's Jinja syntax.",
    );
    expect(await refusal(loadTokenizer(withTemplate('{% endif %}')))).toContain('tokenizer_config.json, chat_template: is not a valid Jinja template (Unknown statement type: endif)');
    expect(await refusal(loadTokenizer(withTemplate(7)))).toContain('tokenizer_config.json, chat_template: is 7, expected a Jinja template or a list of named templates');
    const good = microConfig.chat_template as string;
    expect(await refusal(loadTokenizer(withTemplate([{ name: 'default', template: good }, { name: 'tool_use', template: '{% if %}' }])))).toContain(
      'tokenizer_config.json, chat_template "tool_use": is not a valid Jinja template',
    );
    expect(await refusal(loadTokenizer(withTemplate([{ name: 'tool_use', template: good }])))).toContain(
      'tokenizer_config.json, chat_template: names templates tool_use but none "default", the one chats are rendered with',
    );
    const named = await loadTokenizer(withTemplate([{ name: 'default', template: good }]));
    expect(named.renderChat([{ role: 'user', content: '1+1' }])).toBe('<s><u>1+1<a>');
  });

  it('loads a base model without a chat template, and refuses to chat with it by name', async () => {
    const base = { ...microConfig };
    delete base.chat_template;
    const tok = await loadTokenizer(tokenizerSource(micro, base, 100));
    expect(tok.hasChatTemplate).toBe(false);
    expect(() => tok.renderChat([{ role: 'user', content: '1+1' }])).toThrow(/^tokenizer_config\.json, chat_template: is missing, so this model has no chat format/);
  });
});
