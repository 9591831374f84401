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
import { loadTokenizer, type ChatMessage, type ChatTokenizer } from '../../src/model/tokenizer';
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
